"""The boundary for untrusted numbers, files and text (the sibling of :mod:`boincvm.names`).

Every number a user, a job file or a batch row gives goes through :func:`number_problem` or
:func:`finite`; every file boincvm reads on a user's say-so (a job, a batch, a key, a
template, a script) goes through :func:`read_file_bytes` or :func:`read_text`. So a NaN
never reaches a comparison (every comparison with NaN is false, so NaN passes every range
check written as ``value < 0``), ``1e999`` never reaches ``int()`` (``OverflowError``), a
FIFO is never opened (it would block forever), ``/dev/zero`` is never read into memory,
and undecodable bytes become one sentence naming the file instead of a traceback.

This module is ground: it imports only :mod:`boincvm.errors`.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

from boincvm.errors import InputError

#: What a file read on a user's say-so may hold unless the caller says otherwise.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def number_problem(
    value: float, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> str | None:
    """Why ``value`` is not finite and in ``[low, high]`` (``(low, high]`` with ``low_open``), or None."""
    if math.isnan(value):
        return "is not a number (NaN)"
    if math.isinf(value):
        return f"is {'' if value > 0 else '-'}infinite"
    if low is not None and (value <= low if low_open else value < low):
        return f"must be more than {low:g}" if low_open else f"must be at least {low:g}"
    if high is not None and value > high:
        return f"{value:g} is above the limit of {high:g}"
    return None


def finite(
    value: float,
    what: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """``value`` when it is finite and in range.

    Raises:
        InputError: NaN, infinite or out of range (the sentence names ``what``).
    """
    if problem := number_problem(value, low=low, high=high, low_open=low_open):
        raise InputError(f"{what} {problem}", hint="give a finite number in range (no nan, inf or 1e999)")
    return value


def parse_number(text: str, what: str, *, low: float | None = None, high: float | None = None) -> float:
    """Parse a finite number from untrusted text.

    Raises:
        InputError: not a number, or not finite, or out of range.
    """
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{what}: {text!r} is not a number", hint="write a number such as 1e6") from None
    return finite(value, f"{what} {text!r}", low=low, high=high)


def parse_size(text: str, what: str, *, high: float = 2.0**63 - 1) -> int:
    """Parse a size in bytes (``1e6`` allowed) into an int, refusing NaN, infinities and overflow.

    Raises:
        InputError: not a number, not finite, not positive, or beyond ``high``.
    """
    value = parse_number(text, what)
    return int(finite(value, f"{what} {text!r}", low=0, high=high, low_open=True))


def _kind_problem(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    for test, kind in _KINDS:
        if test(mode):
            return f"is {kind}, not a regular file"
    return "is not a regular file"


def require_regular_file(path: Path, *, what: str) -> None:
    """Refuse, without opening it, a path that is missing or not a regular file (symlinks followed).

    ``stat`` never blocks, so a FIFO is refused at once instead of hanging the open.

    Raises:
        InputError: missing, unreadable, or a directory, FIFO, device or socket.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(
            f"{what} {path} does not exist", hint="check the path (relative paths start here)"
        ) from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}", hint=os_hint(exc)) from None
    if problem := _kind_problem(st.st_mode):
        raise InputError(f"{what} {path} {problem}", hint="give the path of an ordinary file")


def read_file_bytes(path: Path, *, what: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a regular file of at most ``max_bytes``, refusing anything else before reading it.

    The type is checked with ``stat`` (which never blocks) and again on the open descriptor
    (``O_NONBLOCK``: a FIFO swapped in meanwhile does not hang the open), and the read stops
    one byte past the bound, so ``/dev/zero`` or a huge file costs at most ``max_bytes``.

    Raises:
        InputError: missing, unreadable, not a regular file, or larger than ``max_bytes``.
    """
    require_regular_file(path, what=what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}", hint=os_hint(exc)) from None
    with os.fdopen(fd, "rb") as f:
        if problem := _kind_problem(os.fstat(fd).st_mode):
            raise InputError(f"{what} {path} {problem}", hint="give the path of an ordinary file")
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise InputError(f"cannot read {what} {path}: {exc.strerror}", hint=os_hint(exc)) from None
    if len(data) > max_bytes:
        raise InputError(
            f"{what} {path} is larger than the limit of {max_bytes} bytes",
            hint="a file of this kind is small; check that the path names the right file",
        )
    return data


def decode_text(data: bytes, *, what: str, encoding: str = "utf-8") -> str:
    """Decode untrusted bytes, naming the file and the first bad byte when they do not decode.

    Raises:
        InputError: the bytes are not ``encoding``.
    """
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"{what} is not {encoding.upper()} text (byte 0x{data[exc.start]:02x} on line {line})",
            hint=f"save the file as {encoding.upper()} (e.g. iconv -f latin1 -t {encoding} FILE)",
        ) from None


def read_text(path: Path, *, what: str, encoding: str = "utf-8", max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """A regular file's text (see :func:`read_file_bytes` and :func:`decode_text`).

    Raises:
        InputError: see those two.
    """
    return decode_text(
        read_file_bytes(path, what=what, max_bytes=max_bytes), what=f"{what} {path}", encoding=encoding
    )


def os_hint(exc: OSError) -> str:
    """What to do about an operating-system error on a path the user named."""
    import errno

    return {
        errno.ENOENT: "check the path; a parent directory may be missing",
        errno.ENOTDIR: "a component of the path is a file, not a directory; choose another path",
        errno.EISDIR: "the path is a directory; give a file",
        errno.EACCES: "check the permissions, or choose a path you may read and write",
        errno.EPERM: "check the permissions, or choose a path you may read and write",
        errno.EROFS: "the file system is read-only; choose a path on a writable one",
        errno.ENOSPC: "free some space on that file system or choose another one",
        errno.EDQUOT: "your disk quota is full; free some space or choose another file system",
        errno.EEXIST: "something exists at that path already; remove it or choose another path",
        errno.ELOOP: "the path runs through a symlink loop or a symlink boincvm refuses to follow",
        errno.ENAMETOOLONG: "use a shorter path",
        errno.EXDEV: "keep the files on one file system",
    }.get(exc.errno or 0, "check the path and try again")
