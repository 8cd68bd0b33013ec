"""Build the bundled example guest from Debian packages only.

The guest is a Debian cloud kernel plus an initramfs holding busybox (with ``rpm``,
``tar``, ``gzip`` and ``time``), qemu-guest-agent with the libraries it needs, and the
virtio modules; and an ext4 scratch disk formatted on the host. Everything comes from
``apt-get download`` (so only Debian's package registry is contacted) and is unpacked
with ``dpkg-deb``; the library closure of qemu-ga is read from the ELF files inside the
packages, not from the host.

The result lives in ``${XDG_CACHE_HOME:-~/.cache}/boincvm/images/<hash>/``, where the
hash covers the package versions, the recipe and the templates. It is built in a
temporary directory next to it and renamed into place, so a reader never sees half an
image and two concurrent builds cannot clash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import lzma
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from boincvm import guestapi, proc
from boincvm.cache import cache_root
from boincvm.errors import InputError, ToolError
from boincvm.image import elf
from boincvm.image.cpio import Entry, write_newc
from boincvm.image.descriptor import DESCRIPTOR_NAME, ImageDescriptor, ImageFormat
from boincvm.render import render, templates_dir

log = logging.getLogger(__name__)

#: Bumped whenever the build steps change in a way the recipe fields do not show.
BUILD_VERSION = 1
AGENT_PORT = "org.qemu.guest_agent.0"
KERNEL_META = "linux-image-cloud-amd64"
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """What goes into a guest image.

    Attributes:
        name: the recipe's name (``minimal``).
        packages: Debian packages besides the kernel (the kernel is found through ``KERNEL_META``).
        modules: kernel modules put in the initramfs, loaded in this order.
        kernel_cmdline: the command line the image boots with.
        disk_mb: size of the ext4 scratch disk (a sparse qcow2; unused space costs nothing).
        memory_mb: the memory the image suggests.
        exec_dir: where jobs run in the guest.
    """

    name: str
    packages: tuple[str, ...]
    modules: tuple[str, ...]
    kernel_cmdline: str
    disk_mb: int = 1024
    memory_mb: int = 256
    exec_dir: str = "/scratch/boincvm"


#: The fast command line measured in reference/qemu_guest_lab.md; ``init_on_free=1``
#: makes checkpoints smaller because freed pages become zero pages.
#: ``ipv6.disable=1`` spares about 0.15 s of IPv6 set-up under TCG (QEMU's user network,
#: when a job asks for one, is used over IPv4).
FAST_CMDLINE = (
    "console=ttyS0 panic=-1 quiet cryptomgr.notests tsc=reliable no_timer_check nokaslr "
    "mitigations=off i8042.noaux i8042.nokbd random.trust_cpu=on ipv6.disable=1 "
    "initcall_blacklist=crypto_kdf108_init,init_kprobe_trace init_on_free=1"
)

RECIPES: dict[str, Recipe] = {
    "minimal": Recipe(
        name="minimal",
        # qemu-ga's libraries come from these packages (their Depends, resolved by ELF reading).
        packages=(
            "busybox-static",
            "qemu-guest-agent",
            "libc6",
            "libglib2.0-0",
            "libpcre2-8-0",
            "libudev1",
            "libnuma1",
            "liburing2",
        ),
        # CONFIG_VIRTIO*, VIRTIO_CONSOLE and VIRTIO_BLK are modules in Debian's cloud kernel.
        modules=(
            "virtio_ring",
            "virtio",
            "virtio_pci_legacy_dev",
            "virtio_pci_modern_dev",
            "virtio_pci",
            "virtio_mmio",
            "virtio_console",
            "virtio_blk",
            "failover",
            "net_failover",
            "virtio_net",
        ),
        kernel_cmdline=FAST_CMDLINE,
    ),
}


def recipe(name: str) -> Recipe:
    """Return the recipe called ``name``.

    Raises:
        InputError: there is no such recipe.
    """
    try:
        return RECIPES[name]
    except KeyError:
        raise InputError(
            f"unknown image recipe {name!r}", hint=f"choose one of: {', '.join(RECIPES)}"
        ) from None


# -- package resolution ------------------------------------------------------------


def _candidate(package: str) -> str | None:
    out = proc.run(["apt-cache", "policy", package], timeout=60).text
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            return None if value in ("", "(none)") else value
    return None


def _kernel_package() -> str | None:
    out = proc.run(["apt-cache", "depends", KERNEL_META], timeout=60, check=False).text
    for line in out.splitlines():
        dep = line.strip().removeprefix("|")
        if dep.startswith("Depends:"):
            name = dep.split(":", 1)[1].strip()
            if name.startswith("linux-image-") and name.endswith("-cloud-amd64"):
                return name
    return None


def resolve_packages(rec: Recipe, *, update: bool = True) -> dict[str, str]:
    """Find the concrete kernel package and the candidate version of every package.

    Runs ``apt-get update`` once when the package lists do not know a package.

    Raises:
        ToolError: apt cannot resolve a package even after an update.
    """
    for attempt in (0, 1):
        kernel = _kernel_package()
        names = ([kernel] if kernel else []) + list(rec.packages)
        versions = {n: _candidate(n) for n in names}
        missing = [n for n, v in versions.items() if v is None] + ([] if kernel else [KERNEL_META])
        if not missing:
            return {n: v for n, v in versions.items() if v is not None}
        if attempt == 0 and update:
            log.info("apt does not know %s; running apt-get update", ", ".join(missing))
            proc.run(["apt-get", "update", "-qq"], timeout=600)
            continue
        break
    raise ToolError(
        f"apt cannot find {', '.join(missing)}",
        hint="run apt-get update (as root) with Debian's main archive in the sources",
    )


def input_hash(rec: Recipe, packages: dict[str, str]) -> str:
    """The content hash naming an image: package versions, recipe, templates and build version."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"build": BUILD_VERSION, "recipe": asdict(rec), "packages": packages}, sort_keys=True
        ).encode()
    )
    for tpl in sorted((templates_dir() / "guest").glob("*.j2")):
        h.update(tpl.name.encode() + b"\0" + tpl.read_bytes() + b"\0")
    for name in (guestapi.SHELL_SCRIPT, guestapi.PYTHON_MODULE):
        h.update(name.encode() + b"\0" + guestapi.source(name).read_bytes() + b"\0")
    return h.hexdigest()


# -- the build ---------------------------------------------------------------------


def _download(packages: dict[str, str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    specs = [f"{n}={v}" for n, v in sorted(packages.items())]
    proc.run(["apt-get", "download", "-q", *specs], timeout=900, cwd=dest)
    debs = sorted(dest.glob("*.deb"))
    if len(debs) != len(packages):
        raise ToolError(f"apt-get download left {len(debs)} files for {len(packages)} packages in {dest}")
    return debs


def _unpack(packages: dict[str, str], work: Path) -> tuple[Path, str]:
    """Download the packages and unpack them into one root; return it and the kernel's version."""
    root = work / "root"
    for deb in _download(packages, work / "debs"):
        proc.run(["dpkg-deb", "-x", deb, root], timeout=300)
    kernel_pkg = next(p for p in packages if p.startswith("linux-image-"))
    return root, kernel_pkg.removeprefix("linux-image-")


def _find_lib(root: Path, soname: str) -> Path:
    for d in LIB_DIRS:
        candidate = root / d / soname
        if candidate.exists():
            return candidate
    raise ToolError(
        f"{soname} is needed by qemu-ga but is in none of the recipe's packages",
        hint="add the Debian package that ships it to the recipe",
    )


def _library_closure(root: Path, binary: Path) -> dict[str, Path]:
    """soname -> file, for every library ``binary`` needs, transitively."""
    return elf.library_closure([binary], lambda soname: _find_lib(root, soname))


def _module_file(root: Path, kver: str, name: str) -> bytes:
    base = root / "lib" / "modules" / kver / "kernel"
    for candidate in sorted(base.rglob(f"{name}.ko*")):
        if candidate.name == f"{name}.ko":
            return candidate.read_bytes()
        if candidate.name == f"{name}.ko.xz":
            return lzma.decompress(candidate.read_bytes())
    raise ToolError(f"kernel module {name} is not in the kernel package {kver}")


#: Directories every initramfs has, whether or not a file lands in them.
_INITRAMFS_DIRS = frozenset(
    {
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "root",
        "scratch",
        "lib",
        "lib/modules",
        "lib/x86_64-linux-gnu",
        "lib64",
        "var",
    }
)


def _initramfs_entries(root: Path, rec: Recipe, kver: str) -> list[Entry]:
    """The initramfs: busybox, qemu-ga with its libraries, the modules, our init and files;
    every directory first, then the files by path (a later entry replaces one of its path)."""
    entries = [
        *_busybox_entries(root),
        *_agent_entries(root),
        *(Entry.file(f"lib/modules/{m}.ko", _module_file(root, kver, m)) for m in rec.modules),
        *_config_entries(rec),
    ]
    files = {e.path: e for e in entries}
    dirs = set(_INITRAMFS_DIRS)
    for path in files:
        parent = path.rpartition("/")[0]
        while parent:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    return [Entry.dir(d) for d in sorted(dirs)] + [files[p] for p in sorted(files)]


def _busybox_entries(root: Path) -> list[Entry]:
    """busybox and a link for each of its applets."""
    busybox = root / "bin" / "busybox"
    applets = proc.run([busybox, "--list-full"], timeout=30).text.split()
    out = [Entry.file("bin/busybox", busybox.read_bytes(), executable=True)]
    out += [Entry.symlink(applet, "/bin/busybox") for applet in applets if applet != "bin/busybox"]
    out.append(Entry.symlink("sbin/hwclock", "/bin/busybox"))  # guest-set-time needs it
    return out


def _agent_entries(root: Path) -> list[Entry]:
    """qemu-ga, the libraries it loads and the dynamic loader's usual path."""
    qga = root / "usr" / "sbin" / "qemu-ga"
    out = [Entry.file("usr/sbin/qemu-ga", qga.read_bytes(), executable=True)]
    for soname, path in sorted(_library_closure(root, qga).items()):
        out.append(Entry.file(f"lib/x86_64-linux-gnu/{soname}", path.resolve().read_bytes(), executable=True))
    out.append(Entry.symlink("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"))
    return out


def _config_entries(rec: Recipe) -> list[Entry]:
    """Our init, the guest-side BOINC API, users and groups, and the device nodes init needs first."""
    context = {
        "hostname": "boincvm",
        "modules": rec.modules,
        "agent_port": AGENT_PORT,
        "exec_dir": rec.exec_dir,
    }
    return [
        Entry.file("init", render("guest/init.sh.j2", **context).encode(), executable=True),
        # The guest-side BOINC API for shell scripts and Python programs (boincvm guest-api).
        Entry.file(
            guestapi.GUEST_COMMAND_PATH, guestapi.source(guestapi.SHELL_SCRIPT).read_bytes(), executable=True
        ),
        Entry.file(guestapi.GUEST_PYTHON_PATH, guestapi.source(guestapi.PYTHON_MODULE).read_bytes()),
        Entry.file("etc/passwd", render("guest/passwd.j2").encode()),
        Entry.file("etc/group", render("guest/group.j2").encode()),
        Entry.chardev("dev/console", 5, 1),
        Entry.chardev("dev/null", 1, 3, 0o666),
    ]


def _kernel(root: Path, kver: str, out_dir: Path) -> str:
    """Write the kernel; a PVH ``vmlinux`` (boots without decompression) when it can be had."""
    bz = (root / "boot" / f"vmlinuz-{kver}").read_bytes()
    magic = bz.find(b"\x02\x21\x4c\x18")  # the LZ4 legacy frame Debian's bzImage carries
    if magic >= 0:
        # lz4 exits 1 on the trailing bytes after the frame; judge by the output instead.
        done = proc.run(["lz4", "-dc"], input=bz[magic:], timeout=120, check=False)
        data = done.stdout
        if elf.has_pvh_entry(data):
            (out_dir / "vmlinux").write_bytes(data[: elf.elf_size(data)])
            return "vmlinux"
        log.info("no PVH vmlinux in the kernel (lz4 exit %d); using the bzImage", done.returncode)
    (out_dir / "vmlinuz").write_bytes(bz)
    return "vmlinuz"


def _scratch_disk(rec: Recipe, work: Path, out_dir: Path) -> str:
    populate = work / "scratch-root"
    (populate / rec.exec_dir.removeprefix("/scratch/")).mkdir(parents=True)
    raw = work / "scratch.raw"
    with raw.open("wb") as f:
        f.truncate(rec.disk_mb * 1024 * 1024)
    proc.run(
        [
            proc.system_tool("mkfs.ext4"),
            "-q",
            "-F",
            "-L",
            "scratch",
            "-U",
            "2f0c1a5e-6b1d-4f35-9d0a-b0ac0000000a",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            "-d",
            populate,
            raw,
        ],
        timeout=300,
        env={"E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    proc.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, out_dir / "scratch.qcow2"], timeout=300
    )
    raw.unlink()
    return "scratch.qcow2"


def is_built(target: Path, digest: str) -> bool:
    """True when ``target`` holds the image whose inputs hash to ``digest``."""
    with contextlib.suppress(InputError):
        return ImageDescriptor.load(target).input_hash == digest
    return False


def claim_target(target: Path, digest: str) -> bool:
    """True when ``target`` already holds the image ``digest`` names (a cache hit); otherwise
    False once it can be built there: a new or empty directory whose parent exists.

    Raises:
        InputError: ``target`` holds something else.
    """
    if is_built(target, digest):
        return True
    if target.exists() and any(target.iterdir()):
        raise InputError(f"{target} exists and holds something else", hint="choose an empty or new --output")
    target.parent.mkdir(parents=True, exist_ok=True)
    return False


@contextlib.contextmanager
def build_space(target: Path) -> Iterator[Path]:
    """A temporary directory beside ``target`` to build in (so the result can be renamed into
    place), removed afterwards whatever happens."""
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.build-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def publish(out_dir: Path, desc: ImageDescriptor, target: Path) -> None:
    """Describe the image built in ``out_dir``, make it read-only and rename it to ``target``
    (empty or absent: see :func:`claim_target`)."""
    desc.save(out_dir)
    for member in out_dir.iterdir():
        member.chmod(0o444)  # the base image is read-only; VMs write to their overlays
    out_dir.chmod(0o755)
    if target.exists():
        target.rmdir()  # empty (checked above); rename needs it gone
    try:
        out_dir.rename(target)
    except OSError:
        if not is_built(target, desc.input_hash):  # a concurrent build won the race: fine
            raise


def build_guest_image(
    recipe_name: str = "minimal",
    *,
    output: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Build (or find in the cache) the example guest image and return its directory.

    Args:
        recipe_name: which recipe (``minimal``).
        output: where the image directory goes; default the content-addressed cache
            ``<cache>/images/<hash>``. An existing directory is reused only if it holds
            the same build; otherwise it must be empty or absent.
        progress: called with one line per step (the CLI shows them; default: debug log).

    Raises:
        InputError: unknown recipe, or ``output`` holds something else.
        ToolError: apt, dpkg-deb, mkfs.ext4, qemu-img or lz4 is missing or failed.
    """
    say = progress or log.debug
    rec = recipe(recipe_name)
    say("resolving Debian packages")
    packages = resolve_packages(rec)
    digest = input_hash(rec, packages)
    target = output if output is not None else cache_root() / "images" / digest[:24]
    if claim_target(target, digest):
        say(f"cached: {target}")
        return target
    with build_space(target) as work:
        out_dir = work / "image"
        out_dir.mkdir()
        say(f"downloading {len(packages)} packages")
        root, kver = _unpack(packages, work)
        say("writing the initramfs")
        with (out_dir / "initramfs.cpio").open("wb") as f:
            write_newc(f, _initramfs_entries(root, rec, kver))
        say("extracting the kernel")
        kernel = _kernel(root, kver, out_dir)
        say("formatting the scratch disk")
        disk = _scratch_disk(rec, work, out_dir)
        desc = ImageDescriptor(
            format=ImageFormat.KERNEL_INITRD,
            kernel=kernel,
            initrd="initramfs.cpio",
            disk=disk,
            disk_format="qcow2",
            kernel_cmdline=rec.kernel_cmdline,
            guest_tools="qemu-ga",
            exec_dir=rec.exec_dir,
            memory_mb=rec.memory_mb,
            recipe=rec.name,
            input_hash=digest,
            packages=packages,
        )
        publish(out_dir, desc, target)
        say(f"built: {target}")
        return target


def find_cached_image(recipe_name: str = "minimal") -> Path | None:
    """The newest cached image of a recipe, without asking apt (None if none is built)."""
    images = cache_root() / "images"
    best: tuple[float, Path] | None = None
    for d in images.glob("*/"):
        desc = d / DESCRIPTOR_NAME
        with contextlib.suppress(InputError, OSError):
            if ImageDescriptor.load(d).recipe == recipe_name:
                mtime = desc.stat().st_mtime
                if best is None or mtime > best[0]:
                    best = (mtime, d)
    return best[1] if best else None
