"""What a guest hands the wrapper, read as untrusted input (the guest's side of :mod:`boincvm.bounds`).

The guest program's contract names files the wrapper reads while the program runs (fraction
done, credit report, the completion and temporary-exit triggers) and the outputs it copies
out at the end. Whatever is in them, the wrapper never dies on it and never loses the task:

* every number is checked finite (:func:`boincvm.bounds.number_problem`) and clamped into
  its range, and each change is described in a ``note`` the wrapper logs;
* reads are bounded by the caller (``read_guest_file(max_bytes=...)``) and only the tail or
  the first lines are parsed; undecodable bytes are replaced, control characters escaped;
* a file is opened only once the guest's shell has said it is a regular file that stays
  inside the job's directory (:data:`KIND_SCRIPT`). qemu-ga opens files with a blocking
  ``open(2)``: opening a FIFO would wedge the agent for good, and a silent agent looks like a
  dead VM, so the job would be restarted from scratch again and again.

This module is pure (no I/O): the wrapper runs the script and reads the files.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from boincvm.bounds import number_problem

#: A temporary exit asks for at most this long a pause (the client would otherwise
#: park the task for ever on ``inf``); BOINC's own API has no bound.
MAX_TEMPORARY_EXIT_DELAY = 86400.0
#: The delay vboxwrapper uses when the trigger file gives none.
DEFAULT_TEMPORARY_EXIT_DELAY = 300.0
#: Whetstone (``p_fpops``) measures scalar code; vector units do up to 16 times more per
#: core and second (AVX-512: 8 doubles, fused multiply-add). A credit report above what
#: the host could have done even so is not believed.
VECTOR_SLACK = 16.0
#: A trigger's message is cut to this many characters (it ends up in one line of a file).
MAX_MESSAGE_CHARS = 1024
#: BOINC's exit status is a C int.
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1

_NUMBER = re.compile(rb"[-+]?(?:inf(?:inity)?|nan|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", re.IGNORECASE)
#: C0 and C1 controls except tab and newline: a message must not drive a terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Reading:
    """A number read from a guest file.

    Attributes:
        value: the value to use, or None to keep the last one (nothing usable was there).
        note: why the raw value was clamped or ignored, for the log; None when it was used as is.
    """

    value: float | None
    note: str | None = None


@dataclass(frozen=True)
class Trigger:
    """What a completion or temporary-exit trigger file says (vboxwrapper's format:
    the exit code or delay on the first line, a notice flag on the second, then a message).

    Attributes:
        kind: ``completion`` or ``temporary_exit``.
        exit_code: the program's exit code (completion only).
        delay: seconds until the client restarts the task (temporary exit only).
        message: the message, control characters escaped and cut to :data:`MAX_MESSAGE_CHARS`.
        note: why the first line was not used as written, for the log; None when it was.
        is_notice: the second line is ``1``: the client shows the message as a notice.
    """

    kind: str
    exit_code: int = 0
    delay: float = 0.0
    message: str = ""
    note: str | None = None
    is_notice: bool = False


def last_number(data: bytes | None) -> tuple[float, bytes] | None:
    """The last number written in ``data`` (``inf`` and ``nan`` count) and its text, or None."""
    if not data:
        return None
    found = _NUMBER.findall(data[-256:])
    if not found:
        return None
    text: bytes = found[-1]
    return float(text), text


def _shown(text: bytes) -> str:
    return text.decode("ascii", "replace")[:40]


def fraction_done(data: bytes | None, what: str = "fraction done") -> Reading:
    """The fraction done a guest file reports: clamped into [0, 1]; NaN and infinities ignored."""
    got = last_number(data)
    if got is None:
        return Reading(None)
    value, text = got
    if problem := number_problem(value):
        return Reading(None, f"{what} {_shown(text)!r} {problem}; ignored")
    if not 0.0 <= value <= 1.0:
        clamped = min(max(value, 0.0), 1.0)
        return Reading(clamped, f"{what} {_shown(text)!r} is outside [0, 1]; clamped to {clamped:g}")
    return Reading(value)


def ops_bound(*, rsc_fpops_bound: float, p_fpops: float, cpu_time: float) -> float | None:
    """The most operations a credit report may claim: the workunit's ``rsc_fpops_bound``
    (the client aborts a task that needs more) and what the host could have done in
    ``cpu_time`` (its measured ``p_fpops`` per CPU second, times :data:`VECTOR_SLACK`);
    None when neither is known."""
    bounds = []
    if number_problem(rsc_fpops_bound, low=0, low_open=True) is None:
        bounds.append(rsc_fpops_bound)
    if number_problem(p_fpops, low=0, low_open=True) is None and number_problem(cpu_time, low=0) is None:
        bounds.append(p_fpops * cpu_time * VECTOR_SLACK)
    return min(bounds) if bounds else None


def credit_report(data: bytes | None, bound: float | None, what: str = "credit report") -> Reading:
    """The operations a guest file claims: NaN, infinite and negative claims ignored, and
    a claim above ``bound`` (see :func:`ops_bound`) clamped to it."""
    got = last_number(data)
    if got is None:
        return Reading(None)
    value, text = got
    if problem := number_problem(value, low=0):
        return Reading(None, f"{what} {_shown(text)!r} {problem}; ignored")
    if bound is not None and value > bound:
        return Reading(
            bound,
            f"{what} claims {value:g} operations, more than the host could have done ({bound:g}); "
            f"clamped to {bound:g}",
        )
    return Reading(value)


def escape_controls(text: str) -> str:
    """``text`` with every C0 and C1 control but tab and newline shown as ``?``."""
    return _CONTROL.sub("?", text)


def _lines(data: bytes) -> tuple[str, str]:
    text = data.decode("utf-8", "replace")
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    message = _CONTROL.sub("?", "\n".join(lines[2:]).strip())
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return first, message


def _number_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def completion_trigger(data: bytes, what: str = "completion trigger") -> Trigger:
    """Read a completion trigger. A first line that is not a number, or is NaN or infinite,
    counts as exit code 0 (vboxwrapper reads it with ``atoi``); a number outside a C int
    counts as 1 (a failure, never a success by overflow)."""
    first, message = _lines(data)
    shown = _CONTROL.sub("?", first[:40])
    value = _number_or_none(first) if first else 0.0
    if value is None or number_problem(value) is not None:
        note = f"{what} exit code {shown!r} is not a number; taken as 0"
        return Trigger("completion", 0, message=message, note=note)
    if not _INT_MIN <= value <= _INT_MAX:
        note = f"{what} exit code {shown!r} is outside the range of an exit code; taken as 1"
        return Trigger("completion", 1, message=message, note=note)
    return Trigger("completion", int(value), message=message)


def temporary_exit_trigger(data: bytes, what: str = "temporary-exit trigger") -> Trigger:
    """Read a temporary-exit trigger: the delay is clamped into [0, one day]; no number or
    NaN gives vboxwrapper's default of 300 s."""
    first, message = _lines(data)
    second = data.decode("utf-8", "replace").splitlines()[1:2]
    notice = bool(second) and second[0].strip() == "1"
    shown = _CONTROL.sub("?", first[:40])
    value = _number_or_none(first) if first else None
    if value is None or value != value:  # noqa: PLR0124 - NaN is the one value unequal to itself
        note = (
            None
            if not first
            else f"{what} delay {shown!r} is not a number; using {DEFAULT_TEMPORARY_EXIT_DELAY:g} s"
        )
        return Trigger(
            "temporary_exit",
            delay=DEFAULT_TEMPORARY_EXIT_DELAY,
            message=message,
            note=note,
            is_notice=notice,
        )
    clamped = min(max(value, 0.0), MAX_TEMPORARY_EXIT_DELAY)
    note = None
    if clamped != value:
        note = (
            f"{what} delay {shown!r} is outside [0, {MAX_TEMPORARY_EXIT_DELAY:g}] s; clamped to {clamped:g} s"
        )
    return Trigger("temporary_exit", delay=clamped, message=message, note=note, is_notice=notice)


# --------------------------------------------------------------------------------------
# What a guest path is, asked of the guest's own shell before anything opens it


class GuestFileKind(enum.StrEnum):
    """What the guest's shell says a path is (one word per path from :data:`KIND_SCRIPT`)."""

    FILE = "file"
    MISSING = "missing"
    DIRECTORY = "directory"
    FIFO = "fifo"
    CHARACTER_DEVICE = "chardev"
    BLOCK_DEVICE = "blockdev"
    SOCKET = "socket"
    OUTSIDE = "outside"
    OTHER = "other"


_KIND_PROBLEMS = {
    GuestFileKind.DIRECTORY: "is a directory, not a regular file",
    GuestFileKind.FIFO: "is a FIFO (named pipe), not a regular file",
    GuestFileKind.CHARACTER_DEVICE: "is a character device, not a regular file",
    GuestFileKind.BLOCK_DEVICE: "is a block device, not a regular file",
    GuestFileKind.SOCKET: "is a socket, not a regular file",
    GuestFileKind.OUTSIDE: "is a symbolic link that leads out of the job's directory",
    GuestFileKind.OTHER: "is not a regular file",
}

#: The shell function both guest scripts use: ``kind PATH`` sets ``k`` (never opens PATH).
_KIND_FUNCTION = r"""
root=$1; shift
# "/" as the job's directory: every absolute path is inside it.
[ "$root" = / ] && root=
command -v readlink >/dev/null 2>&1 && haverl=1 || haverl=
rr=-
# plain REL: no component of REL, a path below the job's directory, is a link, "." or "..",
# so REL lies inside the directory; tested with test(1) alone (a fork costs a guest under
# TCG more than the whole walk).
plain() {
  q=$root rest=$1
  while :; do
    c=${rest%%/*}
    case "$c" in '' | . | ..) return 1 ;; esac
    q=$q/$c
    [ -L "$q" ] && return 1
    [ "$c" = "$rest" ] && return 0
    rest=${rest#*/}
  done
}
# kind PATH: sets k to the path's kind.
kind() {
  p=$1
  if [ ! -e "$p" ] && [ ! -L "$p" ]; then k=missing; return; fi
  out=
  case "$p" in "$root"/*) lex=1 ;; *) lex= ;; esac
  if [ -n "$lex" ] && plain "${p#"$root"/}"; then
    :
  elif [ -n "$haverl" ]; then
    if [ "$rr" = - ]; then
      rr=$(readlink -f -- "${root:-/}" 2>/dev/null) || rr=$root
      [ "$rr" = / ] && rr=
    fi
    r=$(readlink -f -- "$p" 2>/dev/null) || r=
    case "$r" in "$rr"/*) ;; *) { [ -n "$lex" ] || [ -L "$p" ]; } && out=1 ;; esac
  elif [ -L "$p" ]; then
    out=1
  fi
  if [ -n "$out" ]; then k=outside
  elif [ -f "$p" ]; then k=file
  elif [ -d "$p" ]; then k=directory
  elif [ -p "$p" ]; then k=fifo
  elif [ -c "$p" ]; then k=chardev
  elif [ -b "$p" ]; then k=blockdev
  elif [ -S "$p" ]; then k=socket
  elif [ -L "$p" ]; then k=missing
  else k=other
  fi
}
"""

#: Run by ``/bin/sh -c`` in the guest: ``$1`` the job's directory, then the paths. It prints
#: one kind per path, one line each, in order; it only ``stat``\\ s (``test``), never opens.
#: A path below the job's directory must resolve inside it; a path the job names outside
#: it (an absolute guest name) may not be a symlink that leads out of the directory either.
#: Without ``readlink`` only the final component is checked for being a link.
KIND_SCRIPT = _KIND_FUNCTION + 'for p do kind "$p"; echo "$k"; done\n'

#: Run by ``/bin/sh -c`` in the guest: ``$1`` the job's directory, ``$2`` a token, then
#: ``MAX:PATH`` entries. Per entry it prints the kind as :data:`KIND_SCRIPT` does; for a
#: regular file with MAX above 0 it then prints the token on a line, the file's first MAX
#: bytes, a newline and the token with ``head``'s exit status; for a directory with MAX
#: above 0, its first MAX names (no dot files), one per line, framed the same way. One guest command thus
#: says what every contract file is and hands over the small ones, instead of a command
#: for the kinds and three agent calls per file read. Where ``head -c`` fails its exit
#: status says so, and the wrapper reads that file through the agent instead. A survey of
#: files directly in the job's directory (or below it through no link) forks nothing but
#: one ``head`` per file read (none for an empty one): ``readlink`` runs only for a path
#: with a link on its way. Under TCG every program a guest runs for the first time since
#: its restore costs tens of milliseconds of translation, whatever it does.
#:
#: MAX below 0 is for the wrapper's own files outside the job's directory (the program's
#: output): the kind comes from ``test`` alone (a symbolic link counts as ``outside``,
#: anything else but a regular file as ``other``; no ``readlink`` is forked) and a regular
#: file's last -MAX bytes are framed the same way, with ``tail``'s exit status.
SURVEY_SCRIPT = (
    _KIND_FUNCTION
    + r"""
tok=$1; shift
for a do
  m=${a%%:*}; p=${a#*:}
  if [ "$m" -ge 0 ]; then kind "$p"
  elif [ -L "$p" ]; then k=outside
  elif [ -f "$p" ]; then k=file
  elif [ -e "$p" ]; then k=other
  else k=missing
  fi
  echo "$k"
  if [ "$k" = file ] && [ "$m" -gt 0 ]; then
    echo "$tok"; s=0
    [ -s "$p" ] && { head -c "$m" "$p" 2>/dev/null; s=$?; }
    printf '\n%s %s\n' "$tok" "$s"
  elif [ "$k" = file ] && [ "$m" -lt 0 ]; then
    echo "$tok"; s=0
    [ -s "$p" ] && { tail -c "${m#-}" "$p" 2>/dev/null; s=$?; }
    printf '\n%s %s\n' "$tok" "$s"
  elif [ "$k" = directory ] && [ "$m" -gt 0 ]; then
    # A directory's first names, without forking: the trickle-up directory, mostly empty.
    echo "$tok"; n=0
    for f in "$p"/*; do
      { [ -e "$f" ] || [ -L "$f" ]; } || continue
      n=$((n + 1)); [ "$n" -gt "$m" ] && break
      echo "${f##*/}"
    done
    printf '\n%s 0\n' "$tok"
  fi
done
"""
)


@dataclass(frozen=True)
class Survey:
    """What the guest's shell said of the contract files: each path's kind and, for small
    regular files, their first bytes (see :data:`SURVEY_SCRIPT`)."""

    kinds: Mapping[str, GuestFileKind]
    data: Mapping[str, bytes]

    def kind(self, path: str) -> GuestFileKind:
        return self.kinds.get(path, GuestFileKind.MISSING)


def survey_argv(root: str, token: str, entries: Sequence[tuple[str, int]]) -> list[str]:
    """The guest command that surveys ``entries`` (path, bytes to read; 0: the kind only;
    -N: the last N bytes of one of the wrapper's own files, see :data:`SURVEY_SCRIPT`)."""
    args = [f"{int(m)}:{p}" for p, m in entries]
    return ["/bin/sh", "-c", SURVEY_SCRIPT, "boincvm-survey", root.rstrip("/") or "/", token, *args]


def parse_survey(stdout: bytes, token: str, paths: Sequence[str]) -> Survey | None:
    """What :data:`SURVEY_SCRIPT` printed for ``paths``; None when it does not fit."""
    tok = token.encode("ascii")
    kinds: dict[str, GuestFileKind] = {}
    data: dict[str, bytes] = {}
    pos = 0
    for path in paths:
        nl = stdout.find(b"\n", pos)
        if nl < 0:
            return None
        try:
            kinds[path] = GuestFileKind(stdout[pos:nl].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        pos = nl + 1
        if not stdout.startswith(tok + b"\n", pos):
            continue
        start = pos + len(tok) + 1
        end = stdout.find(b"\n" + tok + b" ", start)
        close = stdout.find(b"\n", end + len(tok) + 2) if end >= 0 else -1
        if close < 0:
            return None
        if stdout[end + len(tok) + 2 : close] == b"0":
            data[path] = stdout[start:end]
        pos = close + 1
    if stdout[pos:].strip():
        return None
    return Survey(kinds, data)


def kinds_argv(root: str, paths: list[str]) -> list[str]:
    """The guest command that prints the kind of each of ``paths`` (``root``: the job's directory)."""
    return ["/bin/sh", "-c", KIND_SCRIPT, "boincvm-kind", root.rstrip("/") or "/", *paths]


def parse_kinds(stdout: bytes, paths: list[str]) -> dict[str, GuestFileKind] | None:
    """The kinds :data:`KIND_SCRIPT` printed, by path; None when its output does not fit."""
    words = stdout.decode("ascii", "replace").split()
    if len(words) != len(paths):
        return None
    kinds: dict[str, GuestFileKind] = {}
    for path, word in zip(paths, words, strict=True):
        try:
            kinds[path] = GuestFileKind(word)
        except ValueError:
            return None
    return kinds


def kind_problem(kind: GuestFileKind) -> str | None:
    """Why a path of this kind must not be read (None for a regular file or a missing one)."""
    return _KIND_PROBLEMS.get(kind)


__all__ = [
    "DEFAULT_TEMPORARY_EXIT_DELAY",
    "MAX_MESSAGE_CHARS",
    "KIND_SCRIPT",
    "MAX_TEMPORARY_EXIT_DELAY",
    "GuestFileKind",
    "Reading",
    "Trigger",
    "completion_trigger",
    "credit_report",
    "escape_controls",
    "fraction_done",
    "kind_problem",
    "kinds_argv",
    "parse_survey",
    "survey_argv",
    "Survey",
    "SURVEY_SCRIPT",
    "last_number",
    "ops_bound",
    "parse_kinds",
    "temporary_exit_trigger",
]
