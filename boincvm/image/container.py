"""A bootable boincvm guest made from a container image (``build-image --from-oci``).

Container images have neither a kernel nor an init, and their own binaries stay untouched.
The guest is:

* the bundled guest's kernel (:mod:`boincvm.image.guest`, built or found in the cache);
* its initramfs (busybox, qemu-guest-agent, virtio modules) with a second cpio archive
  appended (the kernel unpacks concatenated archives in order, later files replacing
  earlier ones) holding our ``/init`` (``templates/guest/oci-init.sh.j2``) and the
  launcher ``/boincvm/oci-run`` (``templates/guest/oci-run.sh.j2``);
* an ext4 disk holding the image's root file system, made by ``mkfs.ext4 -d`` from the
  layers applied in a temporary directory (no root privileges, no loop mount), the modes,
  owners and groups the layers recorded set afterwards with ``debugfs``.

Why the agent stays in the initramfs and jobs are chrooted, rather than ``switch_root``
into the container: many images (``FROM scratch``, distroless) have no shell, and the
wrapper talks to the guest through ``sh`` (making directories, installing packages); an
agent inside the container would also need its libraries and loader put among the
image's files. So the init mounts the container root at ``/container`` with its own
``/proc``, ``/sys`` and ``/dev``; the agent copies inputs to and outputs from
``/container/WORKDIR``; and the launcher enters the root with busybox ``nsenter -r -w -S -G``
(change root, working directory, user and group) and runs Entrypoint + Cmd there.

The image's config becomes a vm job (``boincvm-job.xml`` in the image directory) that
``package-image`` writes into ``vm_job_defaults.xml``: Entrypoint, Cmd, User and
WorkingDir become the launcher's fixed arguments, Env becomes ``setenv``, and
``/container`` + WorkingDir the ``exec_dir``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from boincvm import guestapi, proc
from boincvm.bounds import read_file_bytes
from boincvm.cache import cache_root
from boincvm.errors import InputError, ToolError
from boincvm.image.cpio import Entry, write_newc
from boincvm.image.descriptor import IMAGE_JOB_NAME, ImageDescriptor, ImageFormat
from boincvm.image.guest import (
    AGENT_PORT,
    RECIPES,
    build_guest_image,
    build_space,
    claim_target,
    find_cached_image,
    publish,
)
from boincvm.image.oci import (
    DEFAULT_MAX_ROOT_BYTES,
    ImageConfig,
    OciImage,
    RootTree,
    apply_layers,
    load_image,
)
from boincvm.job import Task, VmJob
from boincvm.job.render import render_job
from boincvm.render import render, templates_dir

log = logging.getLogger(__name__)

#: Bumped whenever the build steps change in a way the inputs do not show.
BUILD_VERSION = 1
#: Where the container's root is mounted in the guest (the agent's view).
CONTAINER_ROOT = "/container"
#: The launcher in the initramfs that enters the container root.
LAUNCHER = "/boincvm/oci-run"
#: The PATH a container gets when its image sets none (Docker's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_TEMPLATES = ("guest/oci-init.sh.j2", "guest/oci-run.sh.j2")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RunAs:
    """The user a container's program runs as: numeric ids and its home directory."""

    uid: int
    gid: int
    home: str


def _read_in_root(root: Path, rel: str) -> str | None:
    """A small text file of the container (``etc/passwd``), or None when absent or not inside it."""
    path = Path(os.path.realpath(root / rel))
    real_root = os.path.realpath(root)
    if not str(path).startswith(real_root + os.sep) or not path.is_file():
        return None
    return read_file_bytes(path, what=f"the image's /{rel}", max_bytes=16 * 1024 * 1024).decode(
        "utf-8", "replace"
    )


def _table(text: str | None) -> list[list[str]]:
    return [line.split(":") for line in (text or "").splitlines() if line and not line.startswith("#")]


def resolve_user(root: Path, user: str) -> RunAs:
    """The ids of ``User`` (``uid``, ``name``, ``uid:gid``, ``name:group``) read from the image's files.

    Raises:
        InputError: a name the image's ``/etc/passwd`` or ``/etc/group`` does not know.
    """
    passwd = _table(_read_in_root(root, "etc/passwd"))
    groups = _table(_read_in_root(root, "etc/group"))
    name, _, group = (user or "0").partition(":")
    entry = next((p for p in passwd if len(p) >= 6 and (p[0] == name or p[2] == name)), None)
    if entry is not None:
        uid, gid, home = int(entry[2]), int(entry[3]), entry[5] or "/"
    elif name.isdigit():
        uid, gid, home = int(name), 0, "/"
    else:
        raise InputError(
            f"the image's User {user!r} is not in its /etc/passwd",
            hint="give a numeric User (USER 1000:1000 in the Dockerfile) or add the user to the image",
        )
    if group:
        found = next((g for g in groups if len(g) >= 3 and (g[0] == group or g[2] == group)), None)
        if found is not None:
            gid = int(found[2])
        elif group.isdigit():
            gid = int(group)
        else:
            raise InputError(
                f"the image's User {user!r} names a group its /etc/group does not know",
                hint="give a numeric group (USER 1000:1000) or add the group to the image",
            )
    return RunAs(uid, gid, home)


def container_task(config: ImageConfig, run_as: RunAs) -> Task:
    """The job defaults an image's config means: the launcher, its fixed words, the environment."""
    words = [
        f"{run_as.uid}:{run_as.gid}",
        config.working_dir,
        str(len(config.entrypoint)),
        *config.entrypoint,
        str(len(config.cmd)),
        *config.cmd,
    ]
    env = list(config.env)
    names = {e.split("=", 1)[0] for e in env}
    if "PATH" not in names:
        env.insert(0, f"PATH={DEFAULT_PATH}")
    if "HOME" not in names:
        env.append(f"HOME={run_as.home}")
    return Task(
        application=LAUNCHER,
        command_line=shlex.join(words),
        exec_dir=CONTAINER_ROOT + config.working_dir.rstrip("/")
        if config.working_dir != "/"
        else CONTAINER_ROOT,
        setenv=tuple(env),
    )


# -- the disk ----------------------------------------------------------------------------


def _debugfs_name(rel: str) -> str:
    return '"/' + rel.replace('"', '""') + '"'


def _fixups(tree: RootTree) -> list[str]:
    """debugfs commands giving each entry the mode, owner and group its layer recorded."""
    cmds: list[str] = []
    for rel, (mode, uid, gid) in sorted(tree.meta.items()):
        try:
            st = (tree.root / rel).lstat()
        except FileNotFoundError:
            continue
        name = _debugfs_name(rel)
        if not stat.S_ISLNK(mode) and stat.S_IMODE(st.st_mode) != stat.S_IMODE(mode):
            cmds.append(f"sif {name} mode 0{stat.S_IFMT(st.st_mode) | stat.S_IMODE(mode):o}")
        if st.st_uid != uid:
            cmds.append(f"sif {name} uid {uid}")
        if st.st_gid != gid:
            cmds.append(f"sif {name} gid {gid}")
    return cmds


def _root_disk(tree: RootTree, work: Path, out_dir: Path, *, free_mb: int, entries: int) -> str:
    """The ext4 root disk (a sparse qcow2) holding the tree."""
    size = tree.nbytes + tree.nbytes // 5 + entries * 4096 + (64 + free_mb) * 1024 * 1024
    size = -(-size // (1 << 20)) * (1 << 20)
    raw = work / "root.raw"
    with raw.open("wb") as f:
        f.truncate(size)
    proc.run(
        [
            proc.system_tool("mkfs.ext4"),
            "-q",
            "-F",
            "-L",
            "container",
            "-U",
            "2f0c1a5e-6b1d-4f35-9d0a-b0ac0000000c",
            "-N",
            str(entries + 65536),
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            "-d",
            tree.root,
            raw,
        ],
        timeout=1800,
        env={"E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    cmds = _fixups(tree)
    if cmds:
        script = work / "fixups.debugfs"
        script.write_text("\n".join(cmds) + "\n", encoding="utf-8")
        done = proc.run([proc.system_tool("debugfs"), "-w", "-f", script, raw], timeout=1800)
        problems = [
            line
            for line in done.stderr.decode("utf-8", "replace").splitlines()
            if line.strip() and not line.startswith("debugfs ")
        ]
        if problems:
            raise ToolError(f"debugfs could not set owners and modes on the root disk: {problems[0]}")
    proc.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, out_dir / "root.qcow2"], timeout=1800
    )
    raw.unlink()
    return "root.qcow2"


def _real_dir(root: Path, rel: str) -> bool:
    """``rel`` is a directory inside ``root`` with no symbolic link on the way (layers may plant them)."""
    here = root
    for part in rel.split("/"):
        here = here / part
        try:
            if not stat.S_ISDIR(here.lstat().st_mode):
                return False
        except OSError:
            return False
    return True


def _add_file(tree: RootTree, rel: str, data: bytes, mode: int) -> None:
    fd = os.open(tree.root / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tree.meta[rel] = (stat.S_IFREG | mode, 0, 0)
    tree.nbytes += len(data)


def add_guest_api(tree: RootTree) -> list[str]:
    """Put the guest API's shell command and Python module into the container's root.

    The image's own files stay untouched: the command goes to the first of
    ``usr/local/bin`` and ``usr/bin`` that is a real directory without a ``boinc`` already,
    the module into each of the image's Python 3 ``site-packages``/``dist-packages``
    directories without a ``boinc.py``. Owned by root, mode 0755/0644.

    Returns:
        The relative paths added, sorted.
    """
    added: list[str] = []
    script = guestapi.source(guestapi.SHELL_SCRIPT).read_bytes()
    for bindir in ("usr/local/bin", "usr/bin"):
        rel = f"{bindir}/boinc"
        if _real_dir(tree.root, bindir):
            if not os.path.lexists(tree.root / rel):
                _add_file(tree, rel, script, 0o755)
                added.append(rel)
            break
    module = guestapi.source(guestapi.PYTHON_MODULE).read_bytes()
    patterns = (
        "usr/lib/python3*/dist-packages",
        "usr/lib/python3*/site-packages",
        "usr/local/lib/python3*/*-packages",
    )
    candidates = sorted(
        {p.relative_to(tree.root).as_posix() for pat in patterns for p in tree.root.glob(pat)}
    )
    for libdir in candidates:
        rel = f"{libdir}/{guestapi.PYTHON_MODULE}"
        if _real_dir(tree.root, libdir) and not os.path.lexists(tree.root / rel):
            _add_file(tree, rel, module, 0o644)
            added.append(rel)
    return sorted(added)


# -- the build ---------------------------------------------------------------------------


def _input_hash(identity: str, base: ImageDescriptor, free_mb: int) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"build": BUILD_VERSION, "image": identity, "base": base.input_hash, "free_mb": free_mb},
            sort_keys=True,
        ).encode()
    )
    for name in _TEMPLATES:
        h.update(name.encode() + b"\0" + (templates_dir() / name).read_bytes() + b"\0")
    for name in (guestapi.SHELL_SCRIPT, guestapi.PYTHON_MODULE):
        h.update(name.encode() + b"\0" + guestapi.source(name).read_bytes() + b"\0")
    return h.hexdigest()


def build_container_image(
    source: Path,
    *,
    output: Path | None = None,
    progress: Progress | None = None,
    max_root_bytes: int = DEFAULT_MAX_ROOT_BYTES,
    free_mb: int = 1024,
) -> Path:
    """Build (or find in the cache) the boincvm guest for the container image at ``source``.

    Args:
        source: an OCI image layout directory or a docker/podman save tarball.
        output: the image directory to make; default ``<cache>/images/oci-<hash>``.
        progress: called with one line per step.
        max_root_bytes: refuse images whose layers unpack to more bytes of files.
        free_mb: free space on the root disk for the job's files (a sparse disk: unused space costs nothing).

    Raises:
        InputError: not an image, not linux/amd64, a hostile layer, a user the image does
            not know, or ``output`` holds something else.
        PathEscapeError: a layer writes outside the root.
        ChecksumError: a blob does not match its digest.
        ToolError: mkfs.ext4, debugfs or qemu-img is missing or failed.
    """
    say = progress or log.debug
    say(f"reading {source}")
    image = load_image(source)
    # The kernel and agent come from the bundled guest: the cached one if there is one
    # (no apt call), else built now.
    base_dir = find_cached_image("minimal") or build_guest_image("minimal", progress=say)
    base = ImageDescriptor.load(base_dir)
    assert base.kernel is not None and base.initrd is not None
    digest = _input_hash(image.identity, base, free_mb)
    target = output if output is not None else cache_root() / "images" / f"oci-{digest[:24]}"
    if claim_target(target, digest):
        say(f"cached: {target}")
        return target
    with build_space(target) as work:
        root = work / "rootfs"
        tree, task = _container_root(image, root, max_root_bytes=max_root_bytes, say=say)
        out_dir = work / "image"
        out_dir.mkdir()
        say("formatting the root disk")
        disk = _root_disk(tree, work, out_dir, free_mb=free_mb, entries=len(tree.meta))
        shutil.rmtree(root)
        say("writing the initramfs")
        _write_initramfs(out_dir / "initramfs.cpio", base_dir / base.initrd)
        shutil.copyfile(base_dir / base.kernel, out_dir / base.kernel)
        (out_dir / IMAGE_JOB_NAME).write_text(render_job(VmJob(task=task)), encoding="utf-8")
        publish(out_dir, _descriptor(base, disk, task, digest), target)
        say(f"built: {target}")
        return target


def _container_root(
    image: OciImage, root: Path, *, max_root_bytes: int, say: Progress
) -> tuple[RootTree, Task]:
    """The image's layers applied in ``root`` with the guest API added, and the task its config calls for."""
    root.mkdir()
    tree = apply_layers(image, root, max_bytes=max_root_bytes, progress=say)
    run_as = resolve_user(root, image.config.user)
    for rel in add_guest_api(tree):
        say(f"guest API: /{rel}")
    return tree, container_task(image.config, run_as)


def _write_initramfs(path: Path, base_initrd: Path) -> None:
    """The bundled guest's initramfs with a second archive appended: our init and the launcher."""
    context = {
        "hostname": "boincvm",
        "modules": RECIPES["minimal"].modules,
        "agent_port": AGENT_PORT,
        "root": CONTAINER_ROOT,
        "launcher": LAUNCHER,
    }
    with path.open("wb") as f:
        f.write(base_initrd.read_bytes())
        write_newc(
            f,
            [
                Entry.file("init", render("guest/oci-init.sh.j2", **context).encode(), executable=True),
                Entry.dir(LAUNCHER.lstrip("/").rsplit("/", 1)[0]),
                Entry.file(
                    LAUNCHER.lstrip("/"),
                    render("guest/oci-run.sh.j2", **context).encode(),
                    executable=True,
                ),
            ],
        )


def _descriptor(base: ImageDescriptor, disk: str, task: Task, digest: str) -> ImageDescriptor:
    """The container guest's descriptor: the bundled guest's kernel and settings, our disk."""
    return ImageDescriptor(
        format=ImageFormat.KERNEL_INITRD,
        kernel=base.kernel,
        initrd="initramfs.cpio",
        disk=disk,
        disk_format="qcow2",
        kernel_cmdline=base.kernel_cmdline,
        guest_tools="qemu-ga",
        exec_dir=task.exec_dir or CONTAINER_ROOT,
        memory_mb=base.memory_mb,
        recipe="oci",
        input_hash=digest,
        packages=base.packages,
    )
