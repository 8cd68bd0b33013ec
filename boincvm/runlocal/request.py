"""What run-local takes (:class:`RunLocalRequest`), shows while it runs (:class:`LiveState`) and
gives back (:class:`RunSummary`); the emulator and the real-client driver share them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from boincvm.runlocal.faults import Fault
from boincvm.runlocal.phases import PhaseHistory

#: Cobblestones: 200 credits per day of a 1 GFLOPS computer.
CREDIT_PER_FLOP = 200.0 / 86400e9


@dataclass(frozen=True)
class RunLocalRequest:
    """What run-local was asked to do."""

    workunit_dir: Path
    app_version_dir: Path
    results_dir: Path
    data_dir: Path
    workunit: str | None = None
    faults: tuple[Fault, ...] = ()
    timeout: float = 3600.0
    checkpoint_period: float = 60.0
    max_starts: int = 20
    keep_slot: bool = False


@dataclass
class LiveState:
    """What the live view shows; updated a few times a second.

    ``phase`` is the wrapper's phase (a :class:`~boincvm.wrapper.status.Phase`'s value) as
    ``history`` tells it, "starting" before the wrapper's first report; under the real client,
    the client's word for the task's state. ``last_output`` is the guest program's latest
    output line(s) the wrapper reported.
    """

    phase: str = "starting"
    fraction_done: float = 0.0
    cpu_time: float = 0.0
    checkpoints: int = 0
    starts: int = 0
    elapsed: float = 0.0
    last_output: str = ""
    accel: str = ""
    wrapper_pid: int | None = None
    #: The most often the wrapper checkpoints (seconds; inf: only when the program asks) and why.
    checkpoint_interval: float = 0.0
    checkpoint_interval_source: str = ""
    events: list[str] = field(default_factory=list)
    history: PhaseHistory = field(default_factory=PhaseHistory)


@dataclass(frozen=True)
class RunSummary:
    """The end of a run-local."""

    workunit: str
    outcome: str
    ok: bool
    exit_code: int | None
    message: str
    elapsed: float
    cpu_time: float
    credit_claimed: float
    ops: float | None
    checkpoints: int
    starts: int
    timings: dict[str, float]
    outputs: list[dict[str, object]]
    results_dir: str
    events: list[str]
    stderr_tail: str
    #: The trickle-up messages the task sent, oldest first: {"variety", "text"}.
    trickles: list[dict[str, str]] = field(default_factory=list)
    #: The most often the wrapper checkpointed (seconds; inf: only when the program asked) and why.
    checkpoint_interval: float = 0.0
    checkpoint_interval_source: str = ""
    #: The requested faults that never happened, each with why (the run ended first).
    faults_missed: list[str] = field(default_factory=list)
    #: Each start of the wrapper's steps in words (``boot -> install -> run (1 checkpoint)``).
    phases: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (an interval of "only when the program asks" is null)."""
        out = dict(self.__dict__)
        if math.isinf(self.checkpoint_interval):
            out["checkpoint_interval"] = None
        return out
