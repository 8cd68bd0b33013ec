"""Runtime archives unpacked once per host: the bundled QEMU, the wrapper's own interpreter.

An app version ships such a runtime as one reproducible ``tar.xz`` whose first member is a
JSON manifest (``runtime.json``: a format number, every file and its sha256).
:func:`unpack_once` extracts it into a directory named by the archive's digest, beside the
archive (for a BOINC task: in the project directory, outside the slot, so every later task
of the same app version finds it there):

- an exclusive ``flock`` on ``.<name>.lock`` makes a second task that starts at the same
  moment wait, then find the directory done;
- the archive is extracted with :mod:`tarfile`'s ``data`` filter (no absolute paths, no
  links out, no devices) into ``.<name>.tmp-*`` in the same parent, checked against its
  manifest, fsynced, then renamed into place: the name appears complete or not at all;
- a task killed mid-unpack leaves only a ``.<name>.tmp-*`` directory, which the next
  unpack removes (under the lock, so never one another task is still writing).

:func:`archive_problem` checks an archive without extracting it (``validate``).
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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from boincvm.atomicdir import fsync_path
from boincvm.errors import InputError, ToolError
from boincvm.hashing import sha256_file

#: The manifest's name, the archive's first member.
MANIFEST = "runtime.json"
#: An unpack by another task is waited for this long (extraction takes seconds).
LOCK_TIMEOUT = 600.0


class ArchiveError(InputError):
    """A runtime archive is damaged or not one boincvm made."""

    default_hint = (
        "the app version's runtime file is damaged: reinstall the app version (BOINC: reset the project)"
    )


@dataclass(frozen=True)
class Kind:
    """What sort of runtime an archive holds.

    Attributes:
        label: its name in messages ("the QEMU runtime").
        prefix: the unpacked directory's name before the digest.
        format: the manifest's format number this code reads.
        required: files every such runtime has.
        error: the error raised for a damaged archive or tree.
    """

    label: str
    prefix: str
    format: int
    required: frozenset[str]
    error: type[InputError] = ArchiveError

    def directory_name(self, archive: Path) -> str:
        """The unpacked directory's name: the prefix and the archive's sha256 (32 hex digits)."""
        return self.prefix + sha256_file(archive)[:32]


def read_manifest(root: Path, kind: Kind) -> dict[str, object]:
    """The manifest of the runtime unpacked at ``root``.

    Raises:
        kind.error: it is missing, unreadable or of another format.
    """
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise kind.error(f"{kind.label} has no readable {MANIFEST}") from exc
    if not isinstance(data, dict) or data.get("format") != kind.format:
        raise kind.error(f"{kind.label}'s {MANIFEST} is not format {kind.format}")
    return data


def check_tree(root: Path, kind: Kind, *, verify: bool = False) -> dict[str, object]:
    """The manifest of ``root`` if every file it lists is there (and, with ``verify``, has the
    sha256 it gives: done once, right after extraction).

    Raises:
        kind.error: the manifest is missing, or a file it lists is, or differs.
    """
    data = read_manifest(root, kind)
    files = data.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise kind.error(f"{kind.label}'s {MANIFEST} has no file list")
    missing = sorted(kind.required - set(files)) + sorted(f for f in files if not (root / f).is_file())
    if missing:
        raise kind.error(f"{kind.label} lacks {missing[0]}")
    if verify:
        digests = data.get("sha256")
        if not isinstance(digests, dict) or set(digests) != set(files):
            raise kind.error(f"{kind.label}'s {MANIFEST} has no digest for every file")
        for f in files:
            if sha256_file(root / f) != digests[f]:
                raise kind.error(f"{kind.label}'s {f} does not match its digest")
    return data


def _fsync_tree(root: Path) -> None:
    # A whole directory is renamed into place, so every file and directory in it is synced
    # first (boincvm.atomicdir.write_file_atomically covers one file, not a tree).
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def _lock_taken(path: Path, timeout: float, kind: Kind) -> ToolError:
    return ToolError(
        f"the lock {path} on {kind.label} stayed taken for {timeout:.0f} s",
        hint="another task is unpacking it; the task starts again later",
    )


@contextlib.contextmanager
def _locked(path: Path, timeout: float, kind: Kind) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ToolError(
            f"{kind.label} cannot be unpacked in {path.parent}: {exc.strerror}",
            hint="the BOINC data directory must be writable by the client's user",
        ) from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise _lock_taken(path, timeout, kind) from exc
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _extract(archive: Path, into: Path, kind: Kind) -> None:
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
                f"no space left to unpack {kind.label} beside {archive}",
                hint="free disk space in the BOINC data directory",
            ) from exc
        raise kind.error(f"{kind.label}'s archive {archive.name} cannot be unpacked: {exc}") from exc


def unpack_once(
    archive: Path, kind: Kind, parent: Path | None = None, *, lock_timeout: float = LOCK_TIMEOUT
) -> tuple[Path, dict[str, object]]:
    """The directory ``archive`` unpacks to in ``parent`` (default: beside the archive),
    unpacked first if not yet, and its manifest.

    Raises:
        kind.error: the archive is damaged or not a runtime archive of this kind.
        ToolError: another unpack held the lock too long, or the disk is full.
    """
    archive = archive.resolve()
    parent = parent or archive.parent
    name = kind.directory_name(archive)
    final = parent / name
    if (final / MANIFEST).is_file():
        return final, check_tree(final, kind)
    with _locked(parent / f".{name}.lock", lock_timeout, kind):
        if (final / MANIFEST).is_file():
            return final, check_tree(final, kind)
        for stale in parent.glob(f".{name}.tmp-*"):  # a start killed mid-unpack
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-"))
        try:
            _extract(archive, work, kind)
            check_tree(work, kind, verify=True)
            _fsync_tree(work)
            work.rename(final)
            fsync_path(parent)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return final, check_tree(final, kind)


def archive_problem(archive: Path, kind: Kind) -> str | None:
    """Why ``archive`` is not a well-formed runtime archive of ``kind`` (None: it is), read
    without extracting: the xz stream intact, a manifest of this format first, every member a
    regular file the manifest lists with its sha256, and every listed file present."""
    try:
        with tarfile.open(archive, mode="r:xz") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile():
                return f"its first member is not {MANIFEST}"
            f = tar.extractfile(first)
            data = json.loads(f.read() if f else b"")
            if not isinstance(data, dict) or data.get("format") != kind.format:
                return f"its {MANIFEST} is not format {kind.format}"
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
    missing = sorted((set(digests) | kind.required) - seen)
    return f"it lacks {missing[0]}" if missing else None


# -- the wrapper's own runtime -------------------------------------------------------------
#: Where the wrapper's runtime keeps the dynamic loader and glibc's libraries.
WRAPPER_LIB_DIR = "lib"
#: The dynamic loader's name in it.
WRAPPER_LOADER = "ld-linux-x86-64.so.2"
#: PyInstaller's one-folder build of the wrapper in it: the program and ``_internal``.
WRAPPER_APP_DIR = "app"
#: The program's name in :data:`WRAPPER_APP_DIR`.
WRAPPER_PROGRAM = "boincvm-wrapper"
#: The environment variable the launcher sets when it falls back to the static wrapper:
#: the runtime archive to unpack for the starts after this one.
WRAPPER_RUNTIME_ENV = "BOINCVM_WRAPPER_RUNTIME"

#: The wrapper's runtime (``boincvm.appversion.wrapper_runtime``) as :func:`unpack_once` handles it.
WRAPPER = Kind(
    label="the wrapper's runtime",
    prefix="boincvm-wrapper-runtime-",
    format=1,
    required=frozenset({f"{WRAPPER_LIB_DIR}/{WRAPPER_LOADER}", f"{WRAPPER_APP_DIR}/{WRAPPER_PROGRAM}"}),
)
