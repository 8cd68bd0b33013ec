"""The faults run-local injects: suspend, quit, SIGKILL, abort and a lost heartbeat, each at a
point of the run (``WHEN``: seconds, a wrapper phase, a progress point or a checkpoint count)."""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Protocol

from boincvm.errors import InputError
from boincvm.wrapper.status import Phase


def describe_interval(seconds: float) -> str:
    """How often the wrapper checkpoints, in words (``inf``: only when the program asks)."""
    return "only when the program asks" if math.isinf(seconds) else f"at most every {seconds:g} s"


class FaultKind(enum.StrEnum):
    """What run-local can do to the wrapper."""

    SUSPEND = "suspend"
    QUIT = "quit"
    KILL = "kill"
    ABORT = "abort"
    HEARTBEAT_LOSS = "heartbeat-loss"


#: The phases a fault may wait for: the wrapper's, less the two it never starts work in.
PHASES = tuple(p.value for p in Phase if p not in (Phase.SUSPENDED, Phase.DONE))

#: ``WHEN``: a point (seconds, a phase, a progress point or a checkpoint count), then
#: ``+SECONDS`` after it, then (suspend only) ``:SECONDS`` of suspension.
_WHEN = re.compile(
    r"(?:(?P<point>progress|checkpoint):(?P<value>[0-9.]+)|(?P<phase>[a-z-]+))?"
    r"(?:\+?(?P<seconds>[0-9.]+))?(?::(?P<duration>[0-9.]+))?"
)


class RunPoint(Protocol):
    """Where a run is, as a fault's point sees it (:class:`~boincvm.runlocal.request.LiveState`)."""

    phase: str
    fraction_done: float
    checkpoints: int


@dataclass(frozen=True)
class Fault:
    """One injected fault, at a point of the run plus ``seconds``.

    The point is the start (no phase, progress or checkpoint count), the moment the wrapper
    reports ``phase``, the first status report with ``progress`` or more done, or the moment
    ``checkpoints`` checkpoints have been committed. Progress and checkpoint points land
    mid-run on any host, however fast the guest computes. ``duration`` is how long a suspend
    lasts.
    """

    kind: FaultKind
    seconds: float = 0.0
    #: The wrapper phase the fault waits for.
    phase: Phase | None = None
    duration: float = 10.0
    progress: float | None = None
    checkpoints: int | None = None

    @classmethod
    def parse(cls, kind: FaultKind, spec: str) -> Fault:
        """Parse a ``WHEN``: ``SECONDS`` after the start, a ``PHASE``, ``progress:FRACTION``
        (the first status report at or above that fraction done) or ``checkpoint:N`` (once N
        checkpoints are committed), each optionally followed by ``+SECONDS``; a suspend may
        end in ``:SECONDS``, how long it lasts.

        Raises:
            InputError: not of that form, an unknown phase, a fraction outside (0, 1] or a
                checkpoint count below 1.
        """
        option = f"--{kind.value}-at {spec!r}"
        hint = "WHEN is for example 30, run+5, progress:0.5 or checkpoint:2 (see run-local --help)"
        m = _WHEN.fullmatch(spec.strip())
        if not m or not (m.group("point") or m.group("phase") or m.group("seconds")):
            raise InputError(f"{option}: not a WHEN", hint=hint)
        try:
            duration = float(m.group("duration")) if m.group("duration") else 10.0
            seconds = float(m.group("seconds") or 0)
            value = float(m.group("value")) if m.group("value") else None
        except ValueError:
            raise InputError(f"{option}: not a number", hint=hint) from None
        phase = m.group("phase")
        if phase and phase not in PHASES:
            raise InputError(f"{option}: unknown phase {phase!r}", hint=f"phases: {', '.join(PHASES)}")
        progress = checkpoints = None
        if m.group("point") == "progress":
            assert value is not None
            if not 0 < value <= 1:
                raise InputError(f"{option}: the fraction must be above 0 and at most 1", hint=hint)
            progress = value
        elif m.group("point") == "checkpoint":
            assert value is not None
            if value < 1 or value != int(value):
                raise InputError(f"{option}: the checkpoint count must be a whole number from 1", hint=hint)
            checkpoints = int(value)
        return cls(kind, seconds, Phase(phase) if phase else None, duration, progress, checkpoints)

    @property
    def lasts(self) -> float | None:
        """Seconds until run-local undoes the fault (a suspend's resume); None: it is for good."""
        return self.duration if self.kind is FaultKind.SUSPEND else None

    def point_reached(self, live: RunPoint) -> bool | None:
        """Whether the run has reached this fault's point; None when the point is the start."""
        if self.phase is not None:
            return live.phase == self.phase
        if self.progress is not None:
            return live.fraction_done >= self.progress
        if self.checkpoints is not None:
            return live.checkpoints >= self.checkpoints
        return None

    def describe(self) -> str:
        """The point in words, for the event log."""
        if self.progress is not None:
            return f"progress {self.progress:g}"
        if self.checkpoints is not None:
            return f"checkpoint {self.checkpoints}"
        return f"phase {self.phase}" if self.phase else f"{self.seconds:g} s"

    def option(self) -> str:
        """The fault as it was asked for on the command line, in words."""
        return f"--{self.kind.value}-at {self.describe()}" + (
            f"+{self.seconds:g}" if self._has_point() else ""
        )

    def _has_point(self) -> bool:
        return bool(self.seconds) and any(
            v is not None for v in (self.phase, self.progress, self.checkpoints)
        )

    def why_missed(self, live: RunPoint, elapsed: float, interval: float, interval_source: str) -> str:
        """Why this fault never happened, for a run that ended (in phase ``live.phase``)."""
        ended = (
            f"the run ended after {elapsed:.0f} s in phase {live.phase}, {live.fraction_done:.0%} done, "
            f"with {live.checkpoints} checkpoint{'s' if live.checkpoints != 1 else ''}"
        )
        if self.checkpoints is not None:
            every = describe_interval(interval)
            return f"{self.option()} never happened: {ended}; checkpoints come {every} ({interval_source})"
        if self.progress is not None:
            return f"{self.option()} never happened: {ended} (the wrapper never reported {self.progress:.0%})"
        if self.phase is not None:
            return f"{self.option()} never happened: {ended}, and phase {self.phase} never came"
        return f"{self.option()} never happened: {ended}, before {self.seconds:g} s"
