"""The bundled QEMU runtime at run time: unpacked once per host, run through its own loader.

The app version ships QEMU as one ``tar.xz`` (built by :mod:`boincvm.appversion.runtime`).
:func:`unpack_once` extracts it into a directory named by the archive's digest, beside the
archive (for a BOINC task: in the project directory, outside the slot, so every later
task of the same app version finds it there):

- an exclusive ``flock`` on ``.<name>.lock`` makes a second task that starts at the same
  moment wait, then find the directory done;
- the archive is extracted with :mod:`tarfile`'s ``data`` filter (no absolute paths, no
  links out, no devices) into ``.<name>.tmp-*`` in the same parent, checked against its
  manifest, fsynced, then renamed into place: the name appears complete or not at all;
- a task killed mid-unpack leaves only a ``.<name>.tmp-*`` directory, which the next
  start removes (under the lock, so never one another task is still writing).

:class:`Runtime` gives the argv prefix that runs a bundled program through the bundled
dynamic loader (``ld-linux-x86-64.so.2 --library-path LIB PROGRAM``), the ``-L`` firmware
directory and ``QEMU_MODULE_DIR``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import lzma
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from boincvm.atomicdir import fsync_path
from boincvm.errors import InputError, ToolError
from boincvm.hashing import sha256_file
from boincvm.hypervisor.base import polls
from boincvm.names import logical_name_problem

#: Names inside the archive (and so in the unpacked directory).
MANIFEST = "runtime.json"
LIB_DIR = "lib"
LOADER = "ld-linux-x86-64.so.2"
MODULE_DIR = "modules"
FIRMWARE_DIR = "share"
PROGRAMS = ("qemu-system-x86_64", "qemu-img")
#: Bump when the archive's layout changes.
RUNTIME_FORMAT = 1
#: Extraction takes seconds; another task's unpack is waited for this long.
LOCK_TIMEOUT = 600.0
#: Prefix of unpacked directories: ``qemu-runtime-<sha256[:32]>``.
PREFIX = "qemu-runtime-"


class RuntimeArchiveError(InputError):
    """The runtime archive is damaged or not one boincvm made."""

    default_hint = (
        "the app version's QEMU runtime file is damaged: reinstall the app version (BOINC: reset the project)"
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


def _read_manifest(root: Path) -> dict[str, object]:
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RuntimeArchiveError(f"the QEMU runtime has no readable {MANIFEST}") from exc
    if not isinstance(data, dict) or data.get("format") != RUNTIME_FORMAT:
        raise RuntimeArchiveError(f"the QEMU runtime's {MANIFEST} is not format {RUNTIME_FORMAT}")
    return data


def check_unpacked(root: Path, *, verify: bool = False) -> Runtime:
    """The runtime at ``root`` if every file its manifest lists is there (and, with
    ``verify``, has the sha256 the manifest gives: done once, right after extraction).

    Raises:
        RuntimeArchiveError: the manifest is missing, or a file it lists is, or differs.
    """
    data = _read_manifest(root)
    files = data.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise RuntimeArchiveError(f"the QEMU runtime's {MANIFEST} has no file list")
    required = {f"{LIB_DIR}/{LOADER}", *(f"bin/{p}" for p in PROGRAMS)}
    missing = sorted(required - set(files)) + sorted(f for f in files if not (root / f).is_file())
    if missing:
        raise RuntimeArchiveError(f"the QEMU runtime lacks {missing[0]}")
    if verify:
        digests = data.get("sha256")
        if not isinstance(digests, dict) or set(digests) != set(files):
            raise RuntimeArchiveError(f"the QEMU runtime's {MANIFEST} has no digest for every file")
        for f in files:
            if hashlib.sha256((root / f).read_bytes()).hexdigest() != digests[f]:
                raise RuntimeArchiveError(f"the QEMU runtime's {f} does not match its digest")
    return Runtime(root, str(data.get("qemu_version", "")))


def _fsync_tree(root: Path) -> None:
    # A whole directory is renamed into place, so every file and directory in it is synced
    # first (boincvm.atomicdir.write_file_atomically covers one file, not a tree).
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def _lock_taken(path: Path, timeout: float) -> ToolError:
    return ToolError(
        f"the QEMU runtime lock {path} stayed taken for {timeout:.0f} s",
        hint="another task is unpacking the runtime; it starts again later",
    )


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ToolError(
            f"the QEMU runtime cannot be unpacked in {path.parent}: {exc.strerror}",
            hint="the BOINC data directory must be writable by the client's user",
        ) from exc
    try:
        for _ in polls(timeout, 0.1):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise _lock_taken(path, timeout) from exc
        else:
            raise _lock_taken(path, timeout)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _extract(archive: Path, into: Path) -> None:
    try:
        # The whole xz stream first: its checksums catch a damaged file before any member
        # is written (tarfile may stop quietly at damage that looks like the end).
        with lzma.open(archive) as xz:
            while xz.read(1 << 20):
                pass
        with tarfile.open(archive, mode="r:xz") as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise ToolError(
                f"no space left to unpack the QEMU runtime beside {archive}",
                hint="free disk space in the BOINC data directory",
            ) from exc
        raise RuntimeArchiveError(
            f"the QEMU runtime archive {archive.name} cannot be unpacked: {exc}"
        ) from exc


def unpack_once(archive: Path, parent: Path | None = None, *, lock_timeout: float = LOCK_TIMEOUT) -> Runtime:
    """The runtime of ``archive``, unpacked into ``parent`` (default: beside the archive) if not yet.

    Raises:
        RuntimeArchiveError: the archive is damaged or not a runtime archive.
        ToolError: another unpack held the lock too long, or the disk is full.
    """
    archive = archive.resolve()
    parent = parent or archive.parent
    name = PREFIX + archive_digest(archive)[:32]
    final = parent / name
    if (final / MANIFEST).is_file():
        return check_unpacked(final)
    with _locked(parent / f".{name}.lock", lock_timeout):
        if (final / MANIFEST).is_file():
            return check_unpacked(final)
        for stale in parent.glob(f".{name}.tmp-*"):  # a start killed mid-unpack
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-"))
        try:
            _extract(archive, work)
            check_unpacked(work, verify=True)
            _fsync_tree(work)
            work.rename(final)
            fsync_path(parent)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return check_unpacked(final)


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
    """Why ``archive`` is not a well-formed runtime archive (None: it is), read without
    extracting: the xz stream intact, a manifest of this format first, every member a
    regular file the manifest lists with its sha256, and every listed file present."""
    try:
        with tarfile.open(archive, mode="r:xz") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile():
                return f"its first member is not {MANIFEST}"
            f = tar.extractfile(first)
            data = json.loads(f.read() if f else b"")
            if not isinstance(data, dict) or data.get("format") != RUNTIME_FORMAT:
                return f"its {MANIFEST} is not format {RUNTIME_FORMAT}"
            digests = data.get("sha256")
            if not isinstance(digests, dict):
                return f"its {MANIFEST} has no digests"
            seen: set[str] = set()
            for member in tar:
                if member is first:
                    continue
                if not member.isfile() or member.name not in digests:
                    return f"{member.name} is not a file its {MANIFEST} lists"
                body = tar.extractfile(member)
                h = hashlib.sha256()
                while body is not None and (block := body.read(1 << 20)):
                    h.update(block)
                if h.hexdigest() != digests[member.name]:
                    return f"{member.name} does not match its digest"
                seen.add(member.name)
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError, ValueError) as exc:
        return f"it cannot be read: {exc}"
    required = {f"{LIB_DIR}/{LOADER}", *(f"bin/{p}" for p in PROGRAMS)}
    missing = sorted((set(digests) | required) - seen)
    return f"it lacks {missing[0]}" if missing else None
