"""The bundled QEMU runtime at run time: unpacked once per host, run through its own loader.

The app version ships QEMU as one ``tar.xz`` (built by :mod:`boincvm.appversion.runtime`),
unpacked once per host beside the archive by :func:`boincvm.unpacked.unpack_once` (content-named,
locked, extracted with tarfile's ``data`` filter, checked, fsynced and renamed into place).

:class:`Runtime` gives the argv prefix that runs a bundled program through the bundled
dynamic loader (``ld-linux-x86-64.so.2 --library-path LIB PROGRAM``), the ``-L`` firmware
directory and ``QEMU_MODULE_DIR``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from boincvm import unpacked
from boincvm.errors import InputError
from boincvm.hashing import sha256_file
from boincvm.names import logical_name_problem
from boincvm.unpacked import MANIFEST, ArchiveError

#: Names inside the archive (and so in the unpacked directory).
LIB_DIR = "lib"
LOADER = "ld-linux-x86-64.so.2"
MODULE_DIR = "modules"
FIRMWARE_DIR = "share"
PROGRAMS = ("qemu-system-x86_64", "qemu-img")
#: Bump when the archive's layout changes.
RUNTIME_FORMAT = 1
#: Extraction takes seconds; another task's unpack is waited for this long.
LOCK_TIMEOUT = unpacked.LOCK_TIMEOUT
#: Prefix of unpacked directories: ``qemu-runtime-<sha256[:32]>``.
PREFIX = "qemu-runtime-"

__all__ = ["MANIFEST", "PREFIX", "Runtime", "RuntimeArchiveError", "unpack_once"]


class RuntimeArchiveError(ArchiveError):
    """The runtime archive is damaged or not one boincvm made."""

    default_hint = (
        "the app version's QEMU runtime file is damaged: reinstall the app version (BOINC: reset the project)"
    )


#: The QEMU runtime as :mod:`boincvm.unpacked` handles it.
KIND = unpacked.Kind(
    label="the QEMU runtime",
    prefix=PREFIX,
    format=RUNTIME_FORMAT,
    required=frozenset({f"{LIB_DIR}/{LOADER}", *(f"bin/{p}" for p in PROGRAMS)}),
    error=RuntimeArchiveError,
    parallel=True,  # the first task waits for the unpack
)


@dataclass(frozen=True)
class Runtime:
    """An unpacked runtime.

    Attributes:
        root: the content-named directory.
        qemu_version: what the manifest says (``QEMU emulator version ...``).
    """

    root: Path
    qemu_version: str

    def command(self, program: str) -> list[str]:
        """The argv prefix that runs bundled ``program`` through the bundled loader."""
        if program not in PROGRAMS:
            raise ValueError(f"not a bundled program: {program}")
        lib = self.root / LIB_DIR
        return [str(lib / LOADER), "--library-path", str(lib), str(self.root / "bin" / program)]

    @property
    def firmware_dir(self) -> Path:
        """The directory for QEMU's ``-L``."""
        return self.root / FIRMWARE_DIR

    @property
    def env(self) -> dict[str, str]:
        """Environment for the QEMU process: where its modules are."""
        return {"QEMU_MODULE_DIR": str(self.root / MODULE_DIR)}


def archive_digest(archive: Path) -> str:
    """sha256 (hex) of the archive file."""
    return sha256_file(archive)


def check_unpacked(root: Path, *, verify: bool = False) -> Runtime:
    """The runtime at ``root`` if every file its manifest lists is there (and, with
    ``verify``, has the sha256 the manifest gives).

    Raises:
        RuntimeArchiveError: the manifest is missing, or a file it lists is, or differs.
    """
    data = unpacked.check_tree(root, KIND, verify=verify)
    return Runtime(root, str(data.get("qemu_version", "")))


def unpack_once(archive: Path, parent: Path | None = None, *, lock_timeout: float = LOCK_TIMEOUT) -> Runtime:
    """The runtime of ``archive``, unpacked into ``parent`` (default: beside the archive) if not yet.

    Raises:
        RuntimeArchiveError: the archive is damaged or not a runtime archive.
        ToolError: another unpack held the lock too long, or the disk is full.
    """
    root, data = unpacked.unpack_once(archive, KIND, parent, lock_timeout=lock_timeout)
    return Runtime(root, str(data.get("qemu_version", "")))


# -- the QEMU a VM runs ----------------------------------------------------------------
@dataclass(frozen=True)
class QemuTools:
    """The QEMU programs one VM runs: a bundled runtime's, or PATH's (``bundled`` None).

    Chosen once per VM from its options (:func:`tools_for`) and handed to everything that
    starts QEMU or qemu-img for it, so nothing depends on which VM of a process came first.
    """

    bundled: Runtime | None = None

    def system_command(self) -> list[str]:
        """argv prefix for ``qemu-system-x86_64``: the bundled one through its loader with its
        firmware directory (``-L``), or PATH's."""
        if self.bundled is None:
            return ["qemu-system-x86_64"]
        return [*self.bundled.command("qemu-system-x86_64"), "-L", str(self.bundled.firmware_dir)]

    def img_command(self) -> list[str]:
        """argv prefix for ``qemu-img``: the bundled one, or PATH's."""
        return ["qemu-img"] if self.bundled is None else self.bundled.command("qemu-img")

    @property
    def env(self) -> dict[str, str] | None:
        """Extra environment for QEMU processes (the bundled module directory), or None."""
        return None if self.bundled is None else self.bundled.env

    def binary(self) -> Path | None:
        """The ``qemu-system-x86_64`` file that runs: the bundled one, or PATH's (None: not installed)."""
        if self.bundled is not None:
            return self.bundled.root / "bin" / "qemu-system-x86_64"
        found = shutil.which("qemu-system-x86_64")
        return Path(found) if found else None


#: QEMU as installed on the host (found on PATH).
PATH_QEMU = QemuTools()


def tools_for(runtime: str, resolve_file: Callable[[str], Path] | None = None) -> QemuTools:
    """The QEMU the ``runtime`` option names: "" for PATH's, else the archive, unpacked once.

    With ``resolve_file`` (the wrapper's: through the slot's link files) ``runtime`` is an
    app-version file's logical name; without it, a path.

    Raises:
        InputError: ``runtime`` is not a plain logical name.
        RuntimeArchiveError: the archive is damaged or not a runtime archive.
        ToolError: another unpack held the lock too long, or the disk is full.
    """
    if not runtime:
        return PATH_QEMU
    if resolve_file is None:
        archive = Path(runtime)
    else:
        problem = logical_name_problem(runtime)
        if problem:
            raise InputError(f"backend option runtime: {problem}")
        archive = resolve_file(runtime).resolve()
    # Unpacked once per host beside the archive; later VMs find the directory done.
    return QemuTools(unpack_once(archive))


def archive_problem(archive: Path) -> str | None:
    """Why ``archive`` is not a well-formed QEMU runtime archive (None: it is), read without
    extracting (:func:`boincvm.unpacked.archive_problem`)."""
    return unpacked.archive_problem(archive, KIND)
