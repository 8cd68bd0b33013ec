"""A deterministic ``newc`` cpio writer for initramfs archives.

Writing the archive ourselves needs no root (device nodes are just headers), and fixed
inode numbers, owners and times make the same inputs give the same bytes.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO


@dataclass(frozen=True)
class Entry:
    """One archive member: a directory, a regular file, a symlink or a character device."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def dir(cls, path: str) -> Entry:
        """A directory, mode 0755."""
        return cls(path, stat.S_IFDIR | 0o755)

    @classmethod
    def file(cls, path: str, data: bytes, *, executable: bool = False) -> Entry:
        """A regular file, mode 0755 or 0644."""
        return cls(path, stat.S_IFREG | (0o755 if executable else 0o644), data)

    @classmethod
    def symlink(cls, path: str, target: str) -> Entry:
        """A symbolic link to ``target``."""
        return cls(path, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, path: str, major: int, minor: int, mode: int = 0o600) -> Entry:
        """A character device node."""
        return cls(path, stat.S_IFCHR | mode, rdev=(major, minor))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _member(out: BinaryIO, ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    out.write(header + encoded + _pad(len(header) + len(encoded)))
    out.write(data + _pad(len(data)))


def write_newc(out: BinaryIO, entries: Iterable[Entry]) -> None:
    """Write ``entries`` (parents before children) as a newc archive, then the trailer."""
    ino = 1
    for e in entries:
        _member(out, ino, e.path.lstrip("/"), e.mode, e.data, e.rdev)
        ino += 1
    _member(out, 0, "TRAILER!!!", 0, b"", (0, 0))
