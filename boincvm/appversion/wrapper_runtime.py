"""The wrapper's runtime: the frozen wrapper without an unpack at every start.

The static executable (:mod:`boincvm.appversion.frozen`) unpacks its libraries and its
Python bundle at every start: about 0.35 s before the wrapper runs a line. The Linux app
version therefore ships three files for the wrapper:

- the main program, a ``/bin/sh`` launcher (:func:`launcher_script`, a few hundred bytes);
- the wrapper's runtime, one ``tar.xz`` (:func:`wrapper_runtime_archive`): PyInstaller's
  one-folder build of the same program, every shared library it loads that it does not
  bring itself (glibc's), and the dynamic loader, with a manifest of sha256 digests;
- the static executable.

The launcher runs the runtime's program through the runtime's loader (``ld.so
--library-path``, as the bundled QEMU runs), from the directory :mod:`boincvm.unpacked`
unpacks it to, beside the archive in the project directory, once per host. Until that
directory is there (the first task of the app version on this host), the launcher starts
the static executable instead and tells it where the archive is; the wrapper unpacks it
while its task runs (:mod:`boincvm.wrapper.self_unpack`). The host still needs nothing but
the BOINC client and a ``/bin/sh``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from boincvm.appversion.frozen import FrozenWrapper, cache_dir, frozen_wrapper
from boincvm.appversion.model import STATIC_WRAPPER_TAIL, WRAPPER_RUNTIME_OPEN_NAME, AppVersionFile
from boincvm.appversion.runtime import LIBRARY_DIRS, LOADER_NAME, XZ_CHUNK, write_archive
from boincvm.errors import ToolError
from boincvm.image.elf import library_closure
from boincvm.proc import HOST_LIBRARY_PATH, WRAPPER_RUNTIME_ENV
from boincvm.render import render
from boincvm.unpacked import (
    MANIFEST,
    WRAPPER,
    WRAPPER_APP_DIR,
    WRAPPER_LIB_DIR,
    WRAPPER_LOADER,
    WRAPPER_PROGRAM,
    archive_problem,
)

#: PyInstaller's one-folder build keeps the interpreter and its libraries here, beside the program.
INTERNAL = "_internal"


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def _find(soname: str, dirs: tuple[Path, ...]) -> Path:
    for d in dirs:
        if (d / soname).is_file():
            return d / soname
    raise ToolError(
        f"the shared library {soname} that the frozen wrapper loads is not in {', '.join(map(str, dirs))}",
        hint="package with --wrapper pyz, or on a Debian or Ubuntu machine",
    )


def runtime_members(
    onedir: Path, library_dirs: tuple[Path, ...] = LIBRARY_DIRS
) -> list[tuple[str, Path, int]]:
    """What the wrapper's runtime holds: (name in the archive, file, mode).

    Every file of the one-folder build under ``app/``; under ``lib/`` the loader and every
    library its ELF files load, directly or not, that the build does not bring itself.

    Raises:
        ToolError: a library is not in ``library_dirs``.
    """
    files = sorted(p for p in onedir.rglob("*") if p.is_file())
    members = [
        (f"{WRAPPER_APP_DIR}/{p.relative_to(onedir).as_posix()}", p, 0o755 if _is_elf(p) else 0o644)
        for p in files
    ]
    internal = onedir / INTERNAL
    dirs = (internal, *library_dirs)
    libs = library_closure([p for p in files if _is_elf(p)], lambda soname: _find(soname, dirs))
    for soname, path in sorted(libs.items()):
        if path.parent != internal and soname != LOADER_NAME:
            members.append((f"{WRAPPER_LIB_DIR}/{soname}", path.resolve(), 0o755))
    loader = _find(LOADER_NAME, library_dirs).resolve()
    members.append((f"{WRAPPER_LIB_DIR}/{WRAPPER_LOADER}", loader, 0o755))
    return members


def wrapper_runtime_archive(frozen: FrozenWrapper | None = None) -> Path:
    """The wrapper's runtime archive for the current sources: from the cache, or packed once
    (xz takes about 10 s). Its name carries the digest of every member, so an upgrade of the
    machine's glibc packs anew.

    Raises:
        CommandNotFound, CommandFailed, ToolError: as :func:`~boincvm.appversion.frozen.frozen_wrapper`,
            or a library is missing.
    """
    frozen = frozen or frozen_wrapper()
    members = runtime_members(frozen.onedir)
    h = hashlib.sha256(f"format {WRAPPER.format}\0xz {XZ_CHUNK}\0".encode())
    for name, path, mode in members:
        h.update(f"{name}\0{mode:o}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    target = cache_dir() / f"{WRAPPER.prefix}{h.hexdigest()[:24]}.tar.xz"
    if target.is_file():
        return target
    part = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        write_archive(members, {"format": WRAPPER.format}, part)
        part.rename(target)  # a concurrent packer wrote the same bytes: either wins
    finally:
        part.unlink(missing_ok=True)
    return target


def launcher_script(*, static: str, archive: str, unpacked: str) -> bytes:
    """The main program: a ``/bin/sh`` script that runs the unpacked runtime ``unpacked``, or
    the static wrapper ``static`` with ``archive`` to unpack (all three names in the project
    directory, beside the script)."""
    return render(
        "wrapper-launcher.sh.j2",
        unpacked=unpacked,
        archive=archive,
        static=static,
        manifest=MANIFEST,
        loader=f"{WRAPPER_LIB_DIR}/{WRAPPER_LOADER}",
        lib=WRAPPER_LIB_DIR,
        internal=f"{WRAPPER_APP_DIR}/{INTERNAL}",
        program=f"{WRAPPER_APP_DIR}/{WRAPPER_PROGRAM}",
        env=WRAPPER_RUNTIME_ENV,
        host_path=HOST_LIBRARY_PATH,
    ).encode("utf-8")


def launcher_problem(directory: Path, files: Sequence[AppVersionFile]) -> str | None:
    """What is wrong with a Linux app version's frozen wrapper in ``directory`` (None: nothing,
    or it has none): the wrapper's runtime a well-formed archive, the static wrapper present
    and executable, and the main program the launcher of exactly these two."""
    runtimes = [f for f in files if f.logical_name == WRAPPER_RUNTIME_OPEN_NAME]
    statics = [f for f in files if f.physical_name.endswith(f"_{STATIC_WRAPPER_TAIL}")]
    mains = [f for f in files if f.main_program]
    if not runtimes and not statics:
        return None  # a zip application, or a frozen wrapper from before the launcher
    if len(runtimes) != 1 or len(statics) != 1 or len(mains) != 1:
        return f"it needs exactly one {WRAPPER_RUNTIME_OPEN_NAME}, one static wrapper and one main program"
    archive, static, main = (directory / f.physical_name for f in (runtimes[0], statics[0], mains[0]))
    for path in (archive, static, main):
        if not path.is_file():
            return f"{path.name} is missing"
    if not os.access(static, os.X_OK):
        return f"the static wrapper {static.name} is not executable (update_versions would not mark it so)"
    problem = archive_problem(archive, WRAPPER)
    if problem:
        return f"the wrapper's runtime {archive.name} is damaged: {problem}"
    expected = launcher_script(
        static=static.name, archive=archive.name, unpacked=WRAPPER.directory_name(archive)
    )
    if main.read_bytes() != expected:
        return f"the main program {main.name} is not the launcher of {static.name} and {archive.name}"
    return None
