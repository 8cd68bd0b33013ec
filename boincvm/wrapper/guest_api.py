"""The guest BOINC API's files (issue #15), read as untrusted input; pure, no I/O.

A BOINCified program built against boincvm's guest library talks to the wrapper through
files in one guest directory, ``<exec_dir>/.boinc/`` (:data:`API_DIR`), named to the
program by ``BOINCVM_API_DIR``. Every file is written as ``NAME.tmp`` and renamed, so a
reader never sees half of one:

* ``resolve`` (wrapper): ``LOGICAL<TAB>GUEST_PATH`` lines, the job's logical file names;
* ``status`` (library): ``key=value`` lines (fraction done, operations, ``uses_checkpoints``,
  ``want_network``: BOINC's ``boinc_waiting_for_network``);
* ``critical`` (library): exists while the program is in a critical section;
* ``checkpoint_request`` (wrapper) / ``checkpoint_ready`` (library): a sequence number each,
  the handshake of an app-timed checkpoint;
* ``finish`` (library): the status on the first line, then a message;
* ``temporary_exit`` (library): vboxwrapper's trigger format (delay, notice flag, reason);
* ``trickle_up/NNNNNNNN.msg`` (library): the variety on the first line, then the text;
* ``trickle_down/NAME`` (wrapper): the client's trickle-down messages for the task;
* ``network_suspended`` (wrapper): present while the client keeps the network off.

The numbers are checked as :mod:`boincvm.wrapper.guest_contract` checks the older files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from boincvm.wrapper.guest_contract import (
    MAX_MESSAGE_CHARS,
    Reading,
    Trigger,
    completion_trigger,
    credit_report,
    fraction_done,
)

#: The API directory, relative to the job's directory in the guest.
API_DIR = ".boinc"
#: The environment variable that names it to the program.
API_DIR_ENV = "BOINCVM_API_DIR"
RESOLVE = "resolve"
STATUS = "status"
CRITICAL = "critical"
CHECKPOINT_REQUEST = "checkpoint_request"
CHECKPOINT_READY = "checkpoint_ready"
FINISH = "finish"
TEMPORARY_EXIT = "temporary_exit"
TRICKLE_UP_DIR = "trickle_up"
TRICKLE_DOWN_DIR = "trickle_down"
NETWORK_SUSPENDED = "network_suspended"
#: At most this much of ``status`` is read.
STATUS_MAX_BYTES = 4096
#: At most this much of one trickle-up message is read (BOINC's own limit is the
#: scheduler request's size; a trickle is meant to be small).
TRICKLE_MAX_BYTES = 65536
#: At most this many trickle-up messages are taken per poll.
TRICKLES_PER_POLL = 16
#: A trickle's variety is a short name (it becomes an XML element's text).
_VARIETY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRICKLE_NAME = re.compile(r"[0-9]{8}\.msg")


@dataclass(frozen=True)
class ApiStatus:
    """What the ``status`` file says.

    Attributes:
        fraction: the fraction done (see :func:`boincvm.wrapper.guest_contract.fraction_done`).
        ops: the operations claimed (``fpops_cumulative``, else ``ops_cumulative``), checked.
        uses_checkpoints: the program has asked ``boinc_time_to_checkpoint()`` at least once.
        want_network: the program waits for the network (``boinc_waiting_for_network(true)``).
    """

    fraction: Reading
    ops: Reading
    uses_checkpoints: bool
    want_network: bool = False


def parse_status(data: bytes, ops_limit: float | None) -> ApiStatus:
    """Read ``status``: unknown keys and malformed lines are ignored; numbers are checked."""
    values: dict[str, bytes] = {}
    for line in data.splitlines()[:64]:
        key, sep, value = line.partition(b"=")
        if sep:
            values[key.strip().decode("ascii", "replace")] = value.strip()
    fraction = (
        fraction_done(values["fraction_done"], "status fraction_done")
        if "fraction_done" in values
        else Reading(None)
    )
    claim = values.get("fpops_cumulative", values.get("ops_cumulative"))
    ops = credit_report(claim, ops_limit, "status operations") if claim is not None else Reading(None)
    return ApiStatus(
        fraction, ops, values.get("uses_checkpoints") == b"1", values.get("want_network") == b"1"
    )


def parse_finish(data: bytes) -> Trigger:
    """Read ``finish``: the exit status on the first line (checked as a completion trigger's
    exit code), then the message."""
    first, _, rest = data.partition(b"\n")
    # completion_trigger skips a notice line; the finish file has none.
    return completion_trigger(first + b"\n\n" + rest, "finish file:")


def sequence_of(data: bytes | None) -> int | None:
    """The sequence number in ``checkpoint_ready``, or None when it holds none."""
    if not data:
        return None
    text = data.strip()[:20]
    return int(text) if text.isdigit() else None


def trickle_names(listing: bytes) -> list[str]:
    """The trickle-up messages a directory listing names, oldest first (others are ignored)."""
    names = {n for n in listing.decode("ascii", "replace").split() if _TRICKLE_NAME.fullmatch(n)}
    return sorted(names)[:TRICKLES_PER_POLL]


def parse_trickle(data: bytes) -> tuple[str, str] | None:
    """A trickle-up message as (variety, text); None when the variety is not a short name.

    The text is what the scheduler gets inside ``<msg_from_host>``: it is sent as written
    (BOINC does not escape it either), with control characters other than tab and newline
    replaced, and cut to :data:`TRICKLE_MAX_BYTES`.
    """
    text = data.decode("utf-8", "replace")
    variety, _, body = text.partition("\n")
    variety = variety.strip()
    if not _VARIETY.fullmatch(variety):
        return None
    return variety, _CONTROL.sub("?", body)[:TRICKLE_MAX_BYTES]


def resolve_text(names: list[tuple[str, str]]) -> str:
    """The ``resolve`` file: one ``LOGICAL<TAB>GUEST_PATH`` line per name (names with a tab
    or a newline cannot be written and are left out: the program then gets the name itself)."""
    lines = [f"{a}\t{b}\n" for a, b in names if not any(c in a + b for c in "\t\n")]
    return "".join(lines)


def shown(message: str) -> str:
    """A message cut for the log."""
    return message[:MAX_MESSAGE_CHARS]


__all__ = [
    "API_DIR",
    "API_DIR_ENV",
    "CHECKPOINT_READY",
    "CHECKPOINT_REQUEST",
    "CRITICAL",
    "FINISH",
    "NETWORK_SUSPENDED",
    "RESOLVE",
    "STATUS",
    "TEMPORARY_EXIT",
    "TRICKLE_DOWN_DIR",
    "TRICKLE_UP_DIR",
    "ApiStatus",
    "parse_finish",
    "parse_status",
    "parse_trickle",
    "resolve_text",
    "sequence_of",
    "trickle_names",
]
