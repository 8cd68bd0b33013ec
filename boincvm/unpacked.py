"""Runtime archives unpacked once per host: the bundled QEMU, the wrapper's own interpreter.

An app version ships such a runtime as one reproducible ``tar.xz`` whose first member is a
JSON manifest (``runtime.json``: a format number, every file and its sha256).
:func:`unpack_once` extracts it into a directory named by the archive's digest, beside the
archive (for a BOINC task: in the project directory, outside the slot, so every later task
of the same app version finds it there):

- an exclusive ``flock`` on ``.<name>.lock`` makes a second task that starts at the same
  moment wait, then find the directory done;
- the archive is extracted in one streaming pass (decompressed once; its xz streams, the
  writer's chunks, decoded on every CPU at once for a :attr:`Kind.parallel` runtime) with
  :mod:`tarfile`'s ``data`` filter (no absolute paths, no links out, no devices) into
  ``.<name>.tmp-*`` in the same parent, every file checked against the manifest's sha256,
  fsynced, then renamed into place: the name appears complete or not at all;
- a task killed mid-unpack leaves only a ``.<name>.tmp-*`` directory, which the next
  unpack removes (under the lock, so never one another task is still writing).

:func:`archive_problem` checks an archive without extracting it (``validate``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
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
from typing import IO, TYPE_CHECKING

from boincvm.atomicdir import fsync_path
from boincvm.errors import InputError, ToolError
from boincvm.hashing import sha256_file

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

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
        parallel: decode the archive's xz streams on every CPU at once (a task waits for
            this unpack); else one after another (an unpack beside a running task).
    """

    label: str
    prefix: str
    format: int
    required: frozenset[str]
    error: type[InputError] = ArchiveError
    parallel: bool = False

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


#: xz's stream header magic, and its footer's.
_XZ_MAGIC, _XZ_FOOTER_MAGIC = b"\xfd7zXZ\x00", b"YZ"
#: Above this many bytes unpacked the streams are decoded one after another (bounded memory).
PARALLEL_MAX_BYTES = 512 << 20


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """xz's multibyte integer at ``at``: its value and the offset after it."""
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80 or shift > 63:
            return value, at


def xz_streams(data: bytes) -> list[tuple[int, int, int]] | None:
    """``(start, end, unpacked size)`` of each stream of the concatenated xz streams ``data``,
    read from the streams' footers and indexes; None when they do not add up (then the file
    is read as one, which reports what is wrong). Checksums are left to the decoder."""
    streams: list[tuple[int, int, int]] = []
    end = len(data)
    try:
        while end > 0:
            while end >= 4 and data[end - 4 : end] == bytes(4):  # stream padding
                end -= 4
            footer = data[end - 12 : end]
            if len(footer) != 12 or footer[10:] != _XZ_FOOTER_MAGIC:
                return None
            index_end = end - 12
            index_start = index_end - (int.from_bytes(footer[4:8], "little") + 1) * 4
            if index_start < 12 or data[index_start] != 0:
                return None
            count, at = _varint(data, index_start + 1)
            blocks = unpacked = 0
            for _ in range(count):
                size, at = _varint(data, at)
                plain, at = _varint(data, at)
                blocks, unpacked = blocks + (size + 3) // 4 * 4, unpacked + plain
            start = index_start - blocks - 12
            if at > index_end or start < 0 or data[start : start + 6] != _XZ_MAGIC:
                return None
            streams.append((start, end, unpacked))
            end = start
    except IndexError:
        return None
    return streams[::-1]


class _Decoded(io.RawIOBase):
    """The concatenation of ``parts`` (decoded chunks, in order) as a readable file."""

    def __init__(self, parts: Iterator[bytes]) -> None:
        self._parts, self._buf, self._at = parts, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: WriteableBuffer) -> int:
        view = memoryview(b).cast("B")
        while self._at == len(self._buf):
            part = next(self._parts, None)
            if part is None:
                return 0
            self._buf, self._at = part, 0
        n = min(len(view), len(self._buf) - self._at)
        view[:n] = self._buf[self._at : self._at + n]
        self._at += n
        return n


def _decode_stream(data: bytes, size: int) -> bytes:
    """One xz stream of ``data``, decoded to no more than the ``size`` its index gives.

    Raises:
        lzma.LZMAError: it is damaged, or its content is not ``size`` bytes.
    """
    decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ)
    out = decoder.decompress(data, max_length=size)
    more = b"" if decoder.eof else decoder.decompress(b"", max_length=1)  # the index, the footer
    if more or not decoder.eof or len(out) != size or decoder.unused_data:
        raise lzma.LZMAError("an xz stream does not match its index")
    return out


@contextlib.contextmanager
def _decoded(archive: Path, parallel: bool) -> Iterator[IO[bytes]]:
    """The archive's tar stream: with ``parallel``, its xz streams (the writer's chunks)
    decoded on every CPU at once, else one LZMAFile. Either fails on damage (checksums) and
    on a truncated file (no end marker)."""
    from concurrent.futures import ThreadPoolExecutor  # only here: a light import otherwise

    data = archive.read_bytes() if parallel else b""
    streams = xz_streams(data) if parallel else None
    workers = min(len(streams or ()), os.cpu_count() or 1)
    if streams is None or workers < 2 or sum(u for _, _, u in streams) > PARALLEL_MAX_BYTES:
        with lzma.open(io.BytesIO(data) if data else archive) as xz:
            yield xz
        return
    with ThreadPoolExecutor(workers) as pool:  # lzma releases the GIL while it decodes
        futures = [pool.submit(_decode_stream, data[a:b], size) for a, b, size in streams]
        try:
            yield io.BufferedReader(_Decoded(f.result() for f in futures), 1 << 20)
        finally:
            for f in futures:  # after a failure: what has not started never does
                f.cancel()


def _extract(archive: Path, into: Path, kind: Kind) -> None:
    try:
        # One pass, decoded once: tarfile reads the stream front to back ("r|"). Damage
        # tarfile takes for the archive's end stops it quietly, so the rest of the stream is
        # read to its end too (past a sound end: only the tar padding). What is written is
        # checked against the manifest's digests afterwards.
        with _decoded(archive, kind.parallel) as stream:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                tar.extractall(into, filter="data")
            while stream.read(1 << 20):
                pass
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

#: The wrapper's runtime (``boincvm.appversion.wrapper_runtime``) as :func:`unpack_once` handles it.
WRAPPER = Kind(
    label="the wrapper's runtime",
    prefix="boincvm-wrapper-runtime-",
    format=1,
    required=frozenset({f"{WRAPPER_LIB_DIR}/{WRAPPER_LOADER}", f"{WRAPPER_APP_DIR}/{WRAPPER_PROGRAM}"}),
)
