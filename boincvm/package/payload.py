"""Read an RPM's payload (the compressed cpio archive) without unpacking it.

busybox ``rpm -i`` installs what the payload holds, not what the header lists, and picks
the decompressor by the payload's magic bytes, not by the header's payload tag. A forged
RPM can list harmless files in its header and carry others; so the checks look at both,
and this module reads the payload the way busybox does: by magic, then ``newc`` cpio.

rpmfile reads the headers well, but its cpio reader keeps only the permission bits of a
mode (no file type, no setuid), so the few lines of ``newc`` parsing live here. Reading is
bounded: it stops past a byte limit or a member limit and says so.
"""

from __future__ import annotations

import bz2
import enum
import gzip
import lzma
import stat
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from boincvm.errors import PackageError

_NEWC = (b"070701", b"070702")
#: rpm >= 4.12 writes this "stripped" cpio header when a file is 4 GiB or larger.
_RPM_LARGE = b"07070X"
_HEADER = 110
_MAX_NAME = 4096
_MAX_LINK = 4096
_CHUNK = 1 << 20
#: cpio pads its end to a block; more than this after the trailer is not padding.
_TAIL = 1 << 20
MAX_MEMBERS = 200_000


class Compression(enum.StrEnum):
    """A payload's compression, told by its magic bytes."""

    GZIP = "gzip"
    BZIP2 = "bzip2"
    XZ = "xz"
    ZSTD = "zstd"
    LZMA = "lzma"
    NONE = "none"
    UNKNOWN = "unknown"


#: What busybox ``rpm -i`` can unpack (it says "no gzip/bzip2/xz magic" otherwise).
BUSYBOX_RPM = frozenset({Compression.GZIP, Compression.BZIP2, Compression.XZ})


#: The magic each stream starts with (a "newc" cpio archive is an uncompressed payload).
_MAGICS = (
    (b"\x1f\x8b", Compression.GZIP),
    (b"BZh", Compression.BZIP2),
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
    (b"\x5d\x00\x00", Compression.LZMA),
    (b"07070", Compression.NONE),
)


def sniff(magic: bytes) -> Compression:
    """The compression whose magic ``magic`` (the first bytes of a stream) starts with."""
    return next((kind for prefix, kind in _MAGICS if magic.startswith(prefix)), Compression.UNKNOWN)


@dataclass(frozen=True)
class PackageEntry:
    """One file of a package (a header's list or a payload's member): absolute install path,
    mode (with type bits), size, link target."""

    path: str
    mode: int
    size: int
    link_target: str = ""

    @property
    def kind(self) -> str:
        """file, dir, symlink, or the odd kinds a package must not have."""
        m = self.mode
        if stat.S_ISDIR(m):
            return "dir"
        if stat.S_ISLNK(m):
            return "symlink"
        if stat.S_ISREG(m) or m & 0o170000 == 0:
            return "file"
        if stat.S_ISCHR(m) or stat.S_ISBLK(m):
            return "device"
        if stat.S_ISFIFO(m):
            return "fifo"
        return "socket" if stat.S_ISSOCK(m) else "other"


#: Marks the install path of a member stored with an absolute name (the checks refuse it).
ABSOLUTE_MARK = "\0abs:"


def install_path(name: str) -> str:
    """The install path of an archive member (rpm and tar store ``./opt/x`` or ``opt/x``); an
    absolute name keeps :data:`ABSOLUTE_MARK` in front, so the checks can refuse it."""
    if name.startswith("/"):
        return ABSOLUTE_MARK + name
    return "/" + (name[2:] if name.startswith("./") else name)


@dataclass(frozen=True)
class Payload:
    """What the payload holds.

    Attributes:
        compression: told by magic bytes.
        members: the members read, by install path (all of them unless ``complete`` is False).
        complete: False when reading stopped at the byte or member limit.
        data_bytes: bytes of file data read (regular files and link targets).
    """

    compression: Compression
    members: tuple[PackageEntry, ...]
    complete: bool
    data_bytes: int


def _open(raw: BinaryIO, compression: Compression) -> BinaryIO:
    if compression is Compression.GZIP:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression is Compression.BZIP2:
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    if compression is Compression.XZ:
        return lzma.LZMAFile(raw, format=lzma.FORMAT_XZ)  # type: ignore[return-value]
    if compression is Compression.LZMA:
        return lzma.LZMAFile(raw, format=lzma.FORMAT_ALONE)  # type: ignore[return-value]
    return raw


def _exact(stream: BinaryIO, n: int, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise PackageError(f"the payload ends in the middle of {what} (truncated package)")
    return data


def _skip(stream: BinaryIO, n: int, what: str) -> None:
    while n > 0:
        got = len(stream.read(min(n, _CHUNK)))
        if got == 0:
            raise PackageError(f"the payload ends in the middle of {what} (truncated package)")
        n -= got


def _drain(stream: BinaryIO) -> None:
    """Read to the end after the trailer, so a truncated or corrupt stream end is caught too."""
    seen = 0
    while chunk := stream.read(_CHUNK):
        seen += len(chunk)
        if seen > _TAIL:
            raise PackageError("the payload has data after the end of its cpio archive")


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def read_payload(raw: BinaryIO, *, max_bytes: int, max_members: int = MAX_MEMBERS) -> Payload:
    """Read the cpio payload starting at ``raw``'s current position.

    Args:
        raw: the package file, positioned at the start of the payload.
        max_bytes: stop (with ``complete=False``) once the file data would pass this.
        max_members: stop once this many members have been read.

    Raises:
        PackageError: the payload is corrupt, truncated, or in a format busybox cannot read.
    """
    start = raw.tell()
    compression = sniff(raw.read(8))
    raw.seek(start)
    if compression in (Compression.ZSTD, Compression.UNKNOWN):
        return Payload(compression, (), False, 0)
    members: list[PackageEntry] = []
    total = 0
    try:
        stream = _open(raw, compression)
        while True:
            head = _exact(stream, _HEADER, "a cpio header")
            if head[:6] == _RPM_LARGE:
                raise PackageError(
                    "the payload uses rpm's large-file cpio format (a file of 4 GiB or more); "
                    "busybox rpm cannot read it"
                )
            if head[:6] not in _NEWC:
                raise PackageError(f"the payload is not a newc cpio archive (magic {head[:6]!r})")
            try:
                fields = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
            except ValueError:
                raise PackageError("the payload has a corrupt cpio header") from None
            mode, size, namesize = fields[1], fields[6], fields[11]
            if not 0 < namesize <= _MAX_NAME:
                raise PackageError(f"the payload has a member name of {namesize} bytes")
            name_raw = _exact(stream, namesize, "a member name")[:-1]
            _skip(stream, _pad(_HEADER + namesize), "a member name")
            name = name_raw.decode("utf-8", "replace")
            if name == "TRAILER!!!":
                _drain(stream)
                return Payload(compression, tuple(members), True, total)
            if total + size > max_bytes or len(members) >= max_members:
                return Payload(compression, tuple(members), False, total + size)
            target = ""
            if mode & 0o170000 == 0o120000:
                if size > _MAX_LINK:
                    raise PackageError(f"the payload has a symlink target of {size} bytes")
                target = _exact(stream, size, "a symlink target").decode("utf-8", "replace")
            else:
                _skip(stream, size, f"the data of {name}")
            _skip(stream, _pad(size), f"the data of {name}")
            total += size
            members.append(PackageEntry(install_path(name), mode, size, target))
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as exc:
        raise PackageError(f"the {compression.value} payload cannot be decompressed ({exc})") from None
