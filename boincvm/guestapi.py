"""The guest-side BOINC API: files an administrator builds a BOINCified program against.

A project's BOINCified program (C, C++, Python or shell) is built against these files
instead of BOINC's API and runs unchanged inside the VM: the calls keep BOINC's names and
signatures and talk to the wrapper through files in ``$BOINCVM_API_DIR`` (the wire
contract is described at the top of ``boinc_api.c``; the wrapper's side is
:mod:`boincvm.wrapper.guest_api`).

:func:`write_guest_api` writes the header, the static library (compiled here with gcc,
cached by content), the C source, the Python module, the shell command and a usage note.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from boincvm import proc
from boincvm.atomicdir import building
from boincvm.cache import cache_root
from boincvm.errors import InputError
from boincvm.render import templates_dir

#: The API's sources, shipped with boincvm (templates/guestapi/).
SOURCE_DIR = "guestapi"
HEADER = "boinc_api.h"
C_SOURCE = "boinc_api.c"
PYTHON_MODULE = "boinc.py"
SHELL_SCRIPT = "boinc.sh"
LIBRARY = "libboinc_api.a"
#: Where the bundled guest image puts the Python module and the shell command.
GUEST_PYTHON_PATH = "usr/lib/python3/dist-packages/boinc.py"
GUEST_COMMAND_PATH = "usr/bin/boinc"
#: The names :func:`write_guest_api` writes (a directory holding only these is rewritten).
WRITTEN = frozenset({HEADER, C_SOURCE, PYTHON_MODULE, "boinc", LIBRARY, "README.txt"})
#: The compiler flags of the static library (part of its cache key).
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=c99", "-fno-strict-aliasing")

_USAGE = """\
boincvm guest API
=================

BOINCified programs built against these files run unchanged inside a boincvm VM.

C / C++:  gcc -O2 prog.c -static -I . -L . -lboinc_api -o prog
          (g++ for C++; boinc_resolve_filename_s, boinc_temporary_exit,
          boinc_finish_message and boinc_waiting_for_network are inline functions
          in boinc_api.h; the calls follow BOINC's boinc_api.h of May 2026, and the
          older network calls boinc_need_network, boinc_network_poll,
          boinc_network_done and boinc_network_usage are kept)
Python:   import boinc   (boinc.py; the bundled guest image has it on Python's path)
Shell:    boinc fraction-done 0.3   (boinc.sh; the bundled guest image has it as /usr/bin/boinc)

Rebuild the library for another target: gcc -O2 -c boinc_api.c && ar rcs libboinc_api.a boinc_api.o
"""


@dataclass(frozen=True)
class GuestApiFiles:
    """What :func:`write_guest_api` wrote.

    Attributes:
        directory: the output directory.
        files: the file names written, sorted.
        library_cached: the static library came from the cache (gcc did not run).
    """

    directory: Path
    files: tuple[str, ...]
    library_cached: bool


def source(name: str) -> Path:
    """One of the API's shipped source files."""
    return templates_dir() / SOURCE_DIR / name


def _library_key(gcc: Path) -> str:
    h = hashlib.sha256()
    for name in (HEADER, C_SOURCE):
        h.update(source(name).read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(proc.run([gcc, "--version"], timeout=60).stdout)
    return h.hexdigest()[:24]


def static_library() -> tuple[Path, bool]:
    """The static library for x86_64, built with gcc and cached by content.

    Returns:
        The library's path and whether it was already in the cache.

    Raises:
        CommandNotFound: gcc or ar is not installed.
        CommandFailed: the compiler refused the source.
    """
    gcc = proc.which("gcc") or Path("gcc")
    key = _library_key(gcc)
    out = cache_root() / "guestapi" / key / LIBRARY
    if out.is_file():
        return out, True
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build.", dir=out.parent) as tmp:
        # Compiled from copies under relative names: the object's file symbol then names
        # no directory of this machine, and ``ar D`` leaves no dates or owners in the archive.
        for name in (HEADER, C_SOURCE):
            shutil.copyfile(source(name), Path(tmp) / name)
        proc.run([gcc, *CFLAGS, "-c", C_SOURCE, "-o", "boinc_api.o"], timeout=300, cwd=Path(tmp))
        proc.run(["ar", "rcsD", LIBRARY, "boinc_api.o"], timeout=60, cwd=Path(tmp))
        lib = Path(tmp) / LIBRARY
        lib.replace(out)
    return out, False


def write_guest_api(directory: Path, *, force: bool = False) -> GuestApiFiles:
    """Write the guest API's files into ``directory``, whole or not at all.

    Raises:
        InputError: ``directory`` is a file or holds other files (without ``force``), or
            cannot be made. A directory holding only the API's files is rewritten.
        ToolError: gcc or ar is missing or failed.
    """
    replace = force
    if directory.is_dir() and not force:
        others = sorted(p.name for p in directory.iterdir() if p.name not in WRITTEN)
        if others:
            raise InputError(
                f"{directory} holds files that are not the guest API's ({', '.join(others[:3])})",
                hint="choose a new directory, or add --force to replace it whole",
            )
        replace = True  # an earlier guest-api run's output: written again, idempotent
    elif directory.exists() and not force:
        raise InputError(
            f"{directory} exists and is not a directory",
            hint="choose a new directory, or add --force to replace it",
        )
    library, cached = static_library()
    with building(directory, force=replace) as tmp:
        for name in (HEADER, C_SOURCE, PYTHON_MODULE):
            shutil.copyfile(source(name), tmp / name)
        shutil.copyfile(source(SHELL_SCRIPT), tmp / "boinc")
        (tmp / "boinc").chmod(0o755)
        shutil.copyfile(library, tmp / LIBRARY)
        (tmp / "README.txt").write_text(_USAGE)
        names = tuple(sorted(p.name for p in tmp.iterdir()))
    return GuestApiFiles(directory=directory, files=names, library_cached=cached)
