"""The bundled QEMU runtime: the admin's QEMU as one compressed app-version file.

:func:`collect_runtime` finds what ``qemu-system-x86_64`` and ``qemu-img`` need on this
machine: the programs, every shared library they load (the ``DT_NEEDED`` closure, read
from the ELF files with :func:`boincvm.image.elf.needed_libraries`, resolved in the
system library directories the way the dynamic loader's default path does), the dynamic
loader itself, the QEMU modules the TCG accelerator lives in (Debian builds it as a
module), and the firmware and option ROMs our machine types load (SeaBIOS, the linux-boot
and PVH option ROMs, kvmvapic, the virtio-net iPXE ROM), from the data directories the
QEMU reports with ``-L help``. :func:`write_runtime_archive` packs them into one
reproducible ``tar.xz`` (members sorted, owner root, mtime 0) with a ``runtime.json``
manifest; the wrapper unpacks it once per host (:mod:`boincvm.hypervisor.qemu.runtime`) and
runs the programs through the bundled loader, so the host's glibc does not matter.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from boincvm import proc
from boincvm.cache import cache_root
from boincvm.errors import ToolError
from boincvm.hypervisor.qemu.runtime import (
    FIRMWARE_DIR,
    LIB_DIR,
    LOADER,
    MANIFEST,
    MODULE_DIR,
    PROGRAMS,
    RUNTIME_FORMAT,
)
from boincvm.image.elf import library_closure as elf_closure

#: Where the dynamic loader and the libraries are looked up on the admin's machine
#: (the loader's default path on Debian/Ubuntu x86_64; /lib64 for the loader on others).
LIBRARY_DIRS = (
    Path("/lib/x86_64-linux-gnu"),
    Path("/usr/lib/x86_64-linux-gnu"),
    Path("/lib64"),
    Path("/usr/lib64"),
    Path("/lib"),
    Path("/usr/lib"),
)
#: The loader's file name (its soname, which the programs' PT_INTERP names).
LOADER_NAME = "ld-linux-x86-64.so.2"
#: The tar is compressed in pieces of this many bytes, one xz stream each, which the unpack
#: decodes in parallel: on 2 cores the 53 MB runtime unpacks in about half the time, and
#: the archive grows by about 1 %.
XZ_CHUNK = 8 << 20
#: QEMU modules the backend needs: TCG, when the host has no usable KVM.
MODULES = ("accel-tcg-x86_64.so",)
#: Where distributions keep QEMU's modules.
MODULE_DIRS = (Path("/usr/lib/x86_64-linux-gnu/qemu"), Path("/usr/lib64/qemu"), Path("/usr/lib/qemu"))
#: Firmware and option ROMs the pc/q35 machines load with our devices: SeaBIOS, the
#: direct kernel boot ROMs (-kernel: linuxboot_dma for bzImage, pvh for vmlinux),
#: kvmvapic (pc with KVM), the virtio-net iPXE ROM (-nic user with virtio-net), and
#: qboot for the microvm machine.
FIRMWARE = (
    "bios-256k.bin",
    "bios-microvm.bin",
    "kvmvapic.bin",
    "linuxboot.bin",
    "linuxboot_dma.bin",
    "multiboot_dma.bin",
    "pvh.bin",
    "efi-virtio.rom",
)


@dataclass(frozen=True)
class RuntimeFiles:
    """What goes into the runtime archive: (name inside it, file on this machine) pairs.

    Attributes:
        programs: ``bin/NAME`` for each of :data:`PROGRAMS`.
        loader: the dynamic loader (``lib/ld-linux-x86-64.so.2``).
        libraries: every other shared library, ``lib/SONAME``.
        modules: QEMU modules, ``modules/NAME``.
        firmware: firmware and option ROMs, ``share/NAME``.
        qemu_version: the first line of ``qemu-system-x86_64 --version``.
    """

    programs: tuple[tuple[str, Path], ...]
    loader: tuple[str, Path]
    libraries: tuple[tuple[str, Path], ...]
    modules: tuple[tuple[str, Path], ...]
    firmware: tuple[tuple[str, Path], ...]
    qemu_version: str

    def members(self) -> list[tuple[str, Path]]:
        """Every file, sorted by its name in the archive."""
        return sorted([*self.programs, self.loader, *self.libraries, *self.modules, *self.firmware])


def _find_library(soname: str, dirs: tuple[Path, ...]) -> Path:
    for d in dirs:
        candidate = d / soname
        if candidate.is_file():
            return candidate
    raise ToolError(
        f"the shared library {soname} that QEMU needs is not in {', '.join(map(str, dirs))}",
        hint="install QEMU from the distribution's packages, or package with --runtime system",
    )


def library_closure(binaries: list[Path], dirs: tuple[Path, ...] = LIBRARY_DIRS) -> dict[str, Path]:
    """Every shared library the ELF ``binaries`` load, directly or not: soname -> file.

    Raises:
        ToolError: a library is not in ``dirs``.
        InputError: a file is not a 64-bit ELF.
    """
    return elf_closure(binaries, lambda soname: _find_library(soname, dirs))


def _firmware_dirs(qemu: Path) -> tuple[Path, ...]:
    """The data directories ``qemu -L help`` lists, in its order."""
    out = proc.run([qemu, "-L", "help"], timeout=60).text
    return tuple(Path(line.strip()).resolve() for line in out.splitlines() if line.strip())


def _find_in(name: str, dirs: tuple[Path, ...], what: str) -> Path:
    for d in dirs:
        if (d / name).is_file():
            return (d / name).resolve()
    raise ToolError(
        f"QEMU's {what} {name} is not in {', '.join(map(str, dirs)) or 'any directory'}",
        hint="install QEMU's firmware packages (seabios, ipxe-qemu), or package with --runtime system",
    )


def collect_runtime(
    qemu: Path | None = None, qemu_img: Path | None = None, *, library_dirs: tuple[Path, ...] = LIBRARY_DIRS
) -> RuntimeFiles:
    """The files of this machine's QEMU that the bundled runtime needs.

    Raises:
        CommandNotFound: QEMU is not installed (not on PATH).
        ToolError: a library, module or firmware file is missing.
    """
    progs: list[Path] = []
    for name, given in zip(PROGRAMS, (qemu, qemu_img), strict=True):
        path = given or proc.which(name)
        if path is None:
            raise ToolError(
                f"{name} is not on PATH, so there is no QEMU to bundle",
                hint="install QEMU (qemu-system-x86, qemu-utils), or package with --runtime system",
            )
        progs.append(path.resolve())
    modules_found = [_find_in(m, MODULE_DIRS, "module") for m in MODULES]
    libs = library_closure([*progs, *modules_found], library_dirs)
    loader_path = _find_library(LOADER_NAME, library_dirs).resolve()
    libs.pop(LOADER_NAME, None)
    fw_dirs = _firmware_dirs(progs[0])
    version = proc.run([progs[0], "--version"], timeout=60).text.splitlines()[0].strip()
    return RuntimeFiles(
        programs=tuple((f"bin/{n}", p) for n, p in zip(PROGRAMS, progs, strict=True)),
        loader=(f"{LIB_DIR}/{LOADER}", loader_path),
        libraries=tuple(sorted((f"{LIB_DIR}/{s}", p.resolve()) for s, p in libs.items())),
        modules=tuple((f"{MODULE_DIR}/{p.name}", p) for p in modules_found),
        firmware=tuple((f"{FIRMWARE_DIR}/{n}", _find_in(n, fw_dirs, "firmware file")) for n in FIRMWARE),
        qemu_version=version,
    )


def _info(name: str, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_archive(
    members: list[tuple[str, Path, int]], manifest: dict[str, object], dest: Path, *, preset: int = 6
) -> Path:
    """Pack ``members`` (name in the archive, file, mode) into the reproducible ``tar.xz`` at
    ``dest`` (written whole, then renamed), after the :data:`MANIFEST` ``manifest`` completed with
    every member's name and sha256, as :mod:`boincvm.unpacked` reads it back.

    The same files give the same bytes: members sorted, owner root, mtime 0. The tar is
    compressed in :data:`XZ_CHUNK` pieces, one xz stream each, concatenated (still one valid
    ``.xz``): the unpack decodes them on every CPU at once. ``preset`` is xz's level (6, its
    default, for app versions; tests use 0, which packs in a tenth of the time).
    """
    members = sorted(members)
    manifest = manifest | {
        "files": [n for n, _, _ in members],
        "sha256": {n: _sha256(p) for n, p, _ in members},
    }
    raw = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info(MANIFEST, len(raw), 0o644), io.BytesIO(raw))
        for name, path, mode in members:
            with path.open("rb") as f:
                tar.addfile(_info(name, path.stat().st_size, mode), f)
    plain = buf.getvalue()
    chunks = [plain[i : i + XZ_CHUNK] for i in range(0, len(plain), XZ_CHUNK)]
    with ThreadPoolExecutor(min(len(chunks), os.cpu_count() or 1)) as pool:
        streams = list(pool.map(lambda c: lzma.compress(c, lzma.FORMAT_XZ, preset=preset), chunks))
    tmp = dest.with_name(f".{dest.name}.part")
    tmp.write_bytes(b"".join(streams))
    tmp.rename(dest)
    return dest


def write_runtime_archive(files: RuntimeFiles, dest: Path, *, preset: int = 6) -> Path:
    """Pack ``files`` into the reproducible QEMU runtime archive at ``dest`` (:func:`write_archive`):
    modes 0755 for programs, the loader, libraries and modules, 0644 for firmware."""
    manifest: dict[str, object] = {
        "format": RUNTIME_FORMAT,
        "qemu_version": files.qemu_version,
        "loader": files.loader[0],
        "programs": {Path(n).name: n for n, _ in files.programs},
    }
    members = [
        (name, path, 0o644 if name.startswith(f"{FIRMWARE_DIR}/") else 0o755)
        for name, path in files.members()
    ]
    return write_archive(members, manifest, dest, preset=preset)


def cached_runtime_archive() -> Path:
    """This machine's runtime archive, from the cache or packed once (xz takes 10-16 s on 2 cores).

    The cache key is the manifest's content (every member's name and sha256, so a QEMU
    upgrade packs anew) and the packing (:data:`XZ_CHUNK`).

    Raises:
        ToolError: as :func:`collect_runtime`.
    """
    files = collect_runtime()
    h = hashlib.sha256(f"format {RUNTIME_FORMAT}\0xz {XZ_CHUNK}\0{files.qemu_version}\0".encode())
    for name, path in files.members():
        h.update(f"{name}\0{_sha256(path)}\0".encode())
    target = cache_root() / "runtime" / f"qemu-runtime-{h.hexdigest()[:24]}.tar.xz"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.{os.getpid()}")
    try:
        write_runtime_archive(files, part)
        part.rename(target)  # a concurrent packer wrote the same bytes: either wins
    finally:
        part.unlink(missing_ok=True)
    return target
