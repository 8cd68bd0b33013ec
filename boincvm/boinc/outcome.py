"""What the emulated client knows about a task and how it classifies the app's exits.

:class:`TaskStatus` is the client's snapshot of a task, :class:`Outcome` how one run of the
app process ended, and :func:`classify_exit` the decision ``ACTIVE_TASK::handle_exited_app``
makes in the 7.20.5 client: the pending request (quit, abort) first, then the temporary-exit
file, the exit code, the finish file and the signal.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass
from pathlib import Path

from boincvm.boinc.files import FinishFile, TemporaryExit, read_temporary_exit
from boincvm.boinc.slot import OutputResult

#: Signals after which the client restarts the task instead of failing it.
RESTART_SIGNALS = frozenset(
    {signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP}
)


class TaskState(enum.StrEnum):
    """The emulated ``ACTIVE_TASK`` state."""

    UNINITIALIZED = "uninitialized"  # not running (before start, between restarts)
    EXECUTING = "executing"
    SUSPENDED = "suspended"
    QUIT_PENDING = "quit_pending"
    ABORT_PENDING = "abort_pending"
    EXITED = "exited"  # finally ended


class OutcomeKind(enum.StrEnum):
    """How one run of the app process ended, as the client classifies it."""

    SUCCESS = "success"  # exit 0 and boinc_finish_called
    COMPUTE_ERROR = "compute_error"  # non-zero exit code
    TEMPORARY_EXIT = "temporary_exit"  # boinc_temporary_exit with a reason: restart after the delay
    PREMATURE_EXIT = "premature_exit"  # exit 0 without a finish file: restart
    QUIT = "quit"  # exited (or was killed) after <quit/>: restart
    ABORTED = "aborted"  # exited (or was killed) after <abort/>
    KILLED = "killed"  # HUP/INT/QUIT/KILL/TERM/STOP: restart
    SIGNALED = "signaled"  # any other signal: error
    TOO_MANY_EXITS = "too_many_exits"  # more than 100 exits without a checkpoint

    @property
    def restarts(self) -> bool:
        """The client starts the task again (same slot) after an exit of this kind."""
        return self in _RESTARTING

    @property
    def counts_as_premature(self) -> bool:
        """The exit counts towards the client's limit of exits without a checkpoint."""
        return self in (OutcomeKind.PREMATURE_EXIT, OutcomeKind.TEMPORARY_EXIT)


_RESTARTING = frozenset(
    {OutcomeKind.TEMPORARY_EXIT, OutcomeKind.PREMATURE_EXIT, OutcomeKind.QUIT, OutcomeKind.KILLED}
)


@dataclass(frozen=True)
class TaskStatus:
    """What the client knows about the task (a snapshot).

    Attributes:
        state: the task state.
        fraction_done: last non-zero fraction done the app reported (0 before).
        current_cpu_time: CPU seconds the app reported (cumulative over runs).
        checkpoint_cpu_time: CPU seconds at the app's last checkpoint.
        fpops_cumulative: floating-point operations reported for credit, if any.
        intops_cumulative: integer operations reported for credit, if any.
        other_pid: the extra process the app named, if any.
        want_network: the app asked for the network.
        elapsed_time: seconds the task has run, over all runs.
        checkpoint_elapsed_time: elapsed time at the last checkpoint.
        status_messages: status messages read during the current or last run.
        heartbeats_sent: heartbeats delivered into the channel during the current or last run.
        starts: how many times the process was started.
        pid: the running process, or None.
    """

    state: TaskState = TaskState.UNINITIALIZED
    fraction_done: float = 0.0
    current_cpu_time: float = 0.0
    checkpoint_cpu_time: float = 0.0
    fpops_cumulative: float | None = None
    intops_cumulative: float | None = None
    other_pid: int | None = None
    want_network: bool = False
    elapsed_time: float = 0.0
    checkpoint_elapsed_time: float = 0.0
    status_messages: int = 0
    heartbeats_sent: int = 0
    starts: int = 0
    pid: int | None = None


@dataclass(frozen=True)
class Outcome:
    """How a run of the process ended.

    Attributes:
        kind: the client's classification.
        will_restart: the client would start the task again (same slot).
        exit_code: the process exit code, or None when a signal ended it.
        signal: the signal that ended it, or None.
        finish: the parsed ``boinc_finish_called``, if the file exists.
        temporary_exit: the parsed ``boinc_temporary_exit``, if honoured.
        message: the client's words for it ("process exited with code 3").
        status: the task status at the exit.
        outputs: the checked output files (final outcomes only).
        stderr_tail: the end of ``stderr.txt`` (final outcomes only).
    """

    kind: OutcomeKind
    will_restart: bool
    exit_code: int | None
    signal: int | None
    finish: FinishFile | None
    temporary_exit: TemporaryExit | None
    message: str
    status: TaskStatus
    outputs: tuple[OutputResult, ...] = ()
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        """Success with every required output present and within its size."""
        return self.kind is OutcomeKind.SUCCESS and all(o.error is None for o in self.outputs)


@dataclass(frozen=True)
class ExitClass:
    """:func:`classify_exit`'s answer: the kind, the client's words, the temporary exit honoured."""

    kind: OutcomeKind
    message: str
    temporary_exit: TemporaryExit | None = None


def classify_exit(state: TaskState, returncode: int, finish: FinishFile | None, slot_dir: Path) -> ExitClass:
    """Classify an exit as ``ACTIVE_TASK::handle_exited_app`` does (``returncode`` as
    :attr:`subprocess.Popen.returncode`: negative for a signal); the temporary-exit file is
    read from ``slot_dir`` only for an exit by code with no request pending."""
    if state is TaskState.ABORT_PENDING:
        return ExitClass(OutcomeKind.ABORTED, "aborted by the client")
    if state is TaskState.QUIT_PENDING:
        return ExitClass(OutcomeKind.QUIT, "exited after <quit/>")
    if returncode >= 0:
        temp = read_temporary_exit(slot_dir)
        if temp is not None:
            notice = " (shown as a notice)" if temp.is_notice else ""
            return ExitClass(
                OutcomeKind.TEMPORARY_EXIT, f"postponed for {temp.delay} s{notice}: {temp.reason}", temp
            )
        if returncode != 0:
            return ExitClass(OutcomeKind.COMPUTE_ERROR, f"process exited with code {returncode}")
        if finish is not None:
            return ExitClass(OutcomeKind.SUCCESS, "finished")
        return ExitClass(OutcomeKind.PREMATURE_EXIT, "exited with zero status but no 'finished' file")
    sig = -returncode
    if sig in RESTART_SIGNALS:
        return ExitClass(OutcomeKind.KILLED, f"process got signal {sig}; restarting")
    return ExitClass(OutcomeKind.SIGNALED, f"process got signal {sig}")


__all__ = [
    "RESTART_SIGNALS",
    "ExitClass",
    "Outcome",
    "OutcomeKind",
    "TaskState",
    "TaskStatus",
    "classify_exit",
]
