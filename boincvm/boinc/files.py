"""The slot directory's protocol files: links, lockfile, finish and temporary-exit files.

Names and formats are BOINC's (``lib/app_ipc.h``, ``api/boinc_api.cpp``,
``client/app_control.cpp``, release 7.20.5). Writers write what the BOINC API writes;
readers read the way the client reads, including its quirks (a temporary-exit file
without a reason line is ignored).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from boincvm.atomicdir import write_file_atomically

INIT_DATA_FILE = "init_data.xml"
FINISH_FILE = "boinc_finish_called"
TEMPORARY_EXIT_FILE = "boinc_temporary_exit"
LOCKFILE = "boinc_lockfile"
MMAP_FILE = "boinc_mmap_file"  # also shm.MMAP_FILE_NAME
STDERR_FILE = "stderr.txt"
STDOUT_FILE = "stdout.txt"
TRICKLE_UP_FILE = "trickle_up.xml"
TASK_STATE_FILE = "boinc_task_state.xml"
UPLOAD_REQUEST_PREFIX = "boinc_ufr_"
UPLOAD_STATUS_PREFIX = "boinc_ufs_"

#: The longest delay the client honours in a temporary-exit file; others become 300 s.
MAX_TEMPORARY_EXIT_DELAY = 86400
#: What the client uses when the delay is missing or out of range.
DEFAULT_TEMPORARY_EXIT_DELAY = 300
#: How long the API waits for a busy slot lock before giving up (``LOCKFILE_TIMEOUT_PERIOD``).
LOCKFILE_TIMEOUT = 35.0
#: What the API does when it cannot get the lock: a temporary exit with this delay and reason.
LOCK_BUSY_DELAY = 600
LOCK_BUSY_REASON = "Waiting to acquire slot directory lock.  Another instance may be running."


class ExitCode(enum.IntEnum):
    """Process exit codes the client gives meaning to (``lib/error_numbers.h``)."""

    SUCCESS = 0
    STATEFILE_WRITE = 192
    SIGNAL = 193
    ABORTED_BY_CLIENT = 194
    CHILD_FAILED = 195
    DISK_LIMIT_EXCEEDED = 196
    TIME_LIMIT_EXCEEDED = 197
    MEM_LIMIT_EXCEEDED = 198
    CLIENT_EXITING = 199
    UNSTARTED_LATE = 200
    MISSING_COPROC = 201
    ABORTED_BY_PROJECT = 202
    ABORTED_VIA_GUI = 203
    UNKNOWN = 204
    OUT_OF_MEMORY = 205
    INIT_FAILURE = 206
    NO_SUB_TASKS = 207
    SUB_TASK_FAILURE = 208


#: The client's result status after more than 100 exits without a checkpoint.
ERR_TOO_MANY_EXITS = -226
#: Exits (premature or temporary) without a checkpoint after which the client gives up.
MAX_PREMATURE_EXITS = 100


# --------------------------------------------------------------------------------------
# Soft links and name resolution

_SOFT_LINK = "<soft_link>"
_XML_ENTITY = re.compile(r"&(#x[0-9a-fA-F]+|#[0-9]+|amp|lt|gt|quot|apos);")
_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


def _xml_unescape(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if name.startswith("#x"):
            return chr(int(name[2:], 16))
        if name.startswith("#"):
            return chr(int(name[1:]))
        return _NAMED[name]

    return _XML_ENTITY.sub(one, text)


def soft_link_text(target: str) -> str:
    """The content of a link file (``make_soft_link``): ``<soft_link>TARGET</soft_link>\\n``."""
    return f"{_SOFT_LINK}{target}</soft_link>\n"


def write_soft_link(link: Path, target: str) -> None:
    """Write a link file at ``link`` naming ``target`` (relative to the slot directory).

    Raises:
        OSError: the file cannot be written.
    """
    link.write_text(soft_link_text(target), encoding="utf-8")


def read_soft_link(path: Path) -> str | None:
    """The target a link file names, or None when ``path`` is not a link file.

    Reads the first line (at most 511 bytes) like ``boinc_resolve_filename``; the target
    is the text after ``<soft_link>`` up to the next ``<``, whitespace-stripped and
    XML-unescaped.
    """
    try:
        with path.open("rb") as f:
            first = f.readline(511)
    except OSError:
        return None
    line = first.decode("utf-8", "replace")
    pos = line.find(_SOFT_LINK)
    if pos < 0:
        return None
    start = line.find(">", pos) + 1
    end = line.find("<", start)
    if end < 0:
        return None
    return _xml_unescape(line[start:end].strip())


def resolve_filename(logical: str, slot_dir: Path) -> Path:
    """The file a logical name refers to (``boinc_resolve_filename``).

    A real symlink, a missing file, or a file that is not a link file resolves to itself;
    a ``<soft_link>`` file resolves to the path it names, relative to the slot directory.
    Resolve an output file before opening it for writing, or you overwrite its link.

    Args:
        logical: the name the app uses (an ``open_name``, e.g. ``job.xml``).
        slot_dir: the slot directory (the app's working directory).
    """
    path = slot_dir / logical
    if path.is_symlink():
        return path
    target = read_soft_link(path)
    if target is None:
        return path
    return slot_dir / target


# --------------------------------------------------------------------------------------
# The slot lock


class SlotLock:
    """``boinc_lockfile``: the POSIX write lock that keeps one app instance per slot.

    It is an ``fcntl`` record lock on the whole file, the same lock ``FILE_LOCK::lock``
    takes, so it excludes a C BOINC app as well. Record locks belong to a process: a
    second lock in the same process always succeeds, and closing any descriptor of the
    file in this process drops the lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.locked = False

    def try_acquire(self) -> bool:
        """Take the lock if it is free.

        Returns:
            False when another process holds it.

        Raises:
            OSError: the lockfile cannot be created.
        """
        if self.locked:
            return True
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o664)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno == errno.ENOSYS:  # no locking on this file system: BOINC carries on
                self.locked = True
                return True
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        self.locked = True
        return True

    def acquire(self, timeout: float = LOCKFILE_TIMEOUT, *, poll: float = 0.25) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds for another holder to leave.

        Raises:
            OSError: the lockfile cannot be created.
        """
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    def release(self) -> None:
        """Drop the lock and delete the file, as ``FILE_LOCK::unlock`` does."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.locked:
            self.path.unlink(missing_ok=True)
        self.locked = False

    def __enter__(self) -> SlotLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------------------
# Finish and temporary-exit files


@dataclass(frozen=True)
class FinishFile:
    """What ``boinc_finish_called`` says.

    Attributes:
        status: the status the app finished with (the client decides by the exit code,
            which should be the same).
        message: a message for the volunteer, or None.
        is_notice: show the message as a notice rather than in the event log.
    """

    status: int = 0
    message: str | None = None
    is_notice: bool = False


@dataclass(frozen=True)
class TemporaryExit:
    """What ``boinc_temporary_exit`` says: restart the task after ``delay`` seconds.

    Attributes:
        delay: seconds the client waits before restarting (as the client read it).
        reason: why, shown to the volunteer.
        is_notice: show the reason as a notice.
    """

    delay: int
    reason: str
    is_notice: bool = False


def _one_line(text: str) -> str:
    return " ".join(text.splitlines()).strip()


def _write_slot_file(slot_dir: Path, name: str, text: str) -> Path:
    """Write one of the app's files to the client (atomically, so a crash never leaves half a file)."""
    path = slot_dir / name
    write_file_atomically(path, text.encode("utf-8"))
    return path


def _read_slot_file(slot_dir: Path, name: str) -> str | None:
    """One of the app's files to the client, or None when there is none; undecodable bytes
    are replaced, since the client reads the file whatever it holds."""
    try:
        return (slot_dir / name).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def finish_file_text(status: int, message: str | None = None, *, is_notice: bool = False) -> str:
    """The content ``boinc_finish_message`` writes: the status, then optionally the
    message and a line that is ``notice`` or empty."""
    text = f"{status}\n"
    if message is not None:
        text += f"{_one_line(message)}\n{'notice' if is_notice else ''}\n"
    return text


def write_finish_file(
    slot_dir: Path, status: int, message: str | None = None, *, is_notice: bool = False
) -> Path:
    """Write ``boinc_finish_called`` (atomically, so a crash never leaves half a file).

    Raises:
        OSError: the file cannot be written.
    """
    return _write_slot_file(slot_dir, FINISH_FILE, finish_file_text(status, message, is_notice=is_notice))


def read_finish_file(slot_dir: Path) -> FinishFile | None:
    """Read ``boinc_finish_called`` as the client does (``finish_file_present``).

    Returns:
        None when the file does not exist. An unreadable status counts as 0; the message
        counts only when a third line follows it.
    """
    text = _read_slot_file(slot_dir, FINISH_FILE)
    if text is None:
        return None
    lines = text.splitlines(keepends=True)
    status = 0
    if lines:
        m = re.match(r"\s*([+-]?\d+)", lines[0])
        if m:
            status = int(m.group(1))
    message = None
    is_notice = False
    if len(lines) >= 3 and lines[1]:
        message = lines[1].rstrip("\n")
        is_notice = "notice" in lines[2]
    return FinishFile(status, message, is_notice)


def temporary_exit_text(delay: float, reason: str, *, is_notice: bool = False) -> str:
    """The content ``boinc_temporary_exit`` writes: delay (integer seconds), reason,
    and ``notice`` when the reason should be a notice."""
    return f"{int(delay)}\n{_one_line(reason)}\n" + ("notice\n" if is_notice else "")


def write_temporary_exit(slot_dir: Path, delay: float, reason: str, *, is_notice: bool = False) -> Path:
    """Write ``boinc_temporary_exit``; the process must then exit (any code; 0 is usual).

    Raises:
        OSError: the file cannot be written.
    """
    return _write_slot_file(
        slot_dir, TEMPORARY_EXIT_FILE, temporary_exit_text(delay, reason, is_notice=is_notice)
    )


def read_temporary_exit(slot_dir: Path) -> TemporaryExit | None:
    """Read ``boinc_temporary_exit`` as the client does (``temporary_exit_file_present``).

    Returns:
        None when the file is missing or has no reason line (the client then ignores it
        and treats the exit as premature). A delay that is missing, negative or above
        86400 becomes 300.
    """
    text = _read_slot_file(slot_dir, TEMPORARY_EXIT_FILE)
    if text is None:
        return None
    m = re.match(r"\s*([+-]?\d+)", text)
    delay = int(m.group(1)) if m else -1
    if not 0 <= delay <= MAX_TEMPORARY_EXIT_DELAY:
        delay = DEFAULT_TEMPORARY_EXIT_DELAY
    pos = m.end() if m else len(text) - len(text.lstrip())
    newline = text.find("\n", pos)
    if newline < 0 or newline + 1 >= len(text):
        return None
    rest = text[newline + 1 :].split("\n", 2)
    reason = rest[0].strip()
    is_notice = len(rest) > 1 and "notice" in rest[1]
    return TemporaryExit(delay, reason, is_notice)
