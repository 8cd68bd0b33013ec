"""The wrapper's phases as run-local shows them: each start's steps in the order the wrapper
took them, once each.

run-local samples the wrapper's status file a few times a second. The file's ``steps`` is the
path the wrapper took, every step in order however short; what run-local adds is below. A
file without ``steps`` (a wrapper older than the list) is read from its samples alone, which
are not quite the path:

* between two steps the file names the phase the wrapper was in before the first of them,
  ``boot`` when it was in none yet: a fresh start reads ``boot -> install -> boot -> run ->
  copy-out -> run -> cleanup -> run -> done``. The wrapper never goes back to a step it has
  taken in the same start, so a phase seen again is that in-between state and is not shown.
  A ``boot`` after another step is shown only when an ``install`` follows it (a checkpoint
  that could not be restored: the wrapper starts afresh); before ``run`` it is the file
  between ``restore`` and ``run``;
* a checkpoint and a suspension are trips out of ``run`` and back; listing them
  (``run -> checkpoint -> run -> checkpoint -> run``) would bury the steps, so they are counted
  on ``run`` instead (``run (2 checkpoints, 1 suspension)``), and shown as a step only while
  one is under way or when the wrapper ended in it (killed in the middle of a snapshot);
* each start of the wrapper (after a quit, a kill, a temporary exit) is a history of its own:
  ``boot -> install -> run (1 checkpoint)`` then ``restore -> run -> copy-out -> cleanup -> done``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from boincvm.wrapper.status import EXCURSIONS, Phase


@dataclass
class _Start:
    """The steps of one start of the wrapper."""

    steps: list[Phase] = field(default_factory=list)
    #: The checkpoint or suspension under way (the last one, once the start has ended).
    excursion: Phase | None = None
    suspensions: int = 0
    #: The committed checkpoints the first report of this start counted (a restore's included).
    checkpoints_before: int | None = None
    checkpoints: int = 0
    #: A ``boot`` seen after another step: shown only if an ``install`` follows.
    boot_pending: bool = False

    def observe(self, phase: Phase, checkpoints: int, steps: Sequence[Phase] = ()) -> None:
        before = checkpoints if self.checkpoints_before is None else min(self.checkpoints_before, checkpoints)
        self.checkpoints_before = before  # a restore that failed starts afresh, from none
        self.checkpoints = checkpoints - before
        if steps:  # the wrapper's own list of its steps: the truth, however short a step was
            self.steps, self.boot_pending = list(steps), False
        if phase in EXCURSIONS:
            if phase is Phase.SUSPENDED and self.excursion is not Phase.SUSPENDED:
                self.suspensions += 1
            self.excursion = phase
            return
        self.excursion = None
        if steps:
            return
        if phase in self.steps:  # the file between two steps, or the same step seen again
            return
        if phase is Phase.BOOT and self.steps:
            self.boot_pending = True
            return
        if self.boot_pending and phase is Phase.INSTALL:
            self.steps.append(Phase.BOOT)
        self.boot_pending = False
        self.steps.append(phase)

    @property
    def current(self) -> Phase | None:
        return self.excursion or (self.steps[-1] if self.steps else None)

    def render(self) -> str:
        words = [p.value + (self._notes() if p is Phase.RUN else "") for p in self.steps]
        if self.excursion is not None:
            words.append(self.excursion.value)
        return " -> ".join(words)

    def _notes(self) -> str:
        notes = [
            f"{n} {word}{'s' if n != 1 else ''}"
            for n, word in ((self.checkpoints, "checkpoint"), (self.suspensions, "suspension"))
            if n
        ]
        return f" ({', '.join(notes)})" if notes else ""


@dataclass
class PhaseHistory:
    """The phases of every start of the wrapper, fed with what its status file says."""

    _starts: list[_Start] = field(default_factory=list)

    def new_start(self) -> None:
        """The wrapper has been started (again): what follows is a history of its own."""
        self._starts.append(_Start())

    def observe(self, phase: Phase, checkpoints: int, steps: Sequence[Phase] = ()) -> None:
        """The status file says ``phase``, with ``checkpoints`` committed checkpoints, and the
        steps this start took (empty from a file that does not list them)."""
        if not self._starts:
            self.new_start()
        self._starts[-1].observe(phase, checkpoints, steps)

    @property
    def current(self) -> Phase | None:
        """The step the wrapper is in as the history tells it; None before its first report."""
        return self._starts[-1].current if self._starts else None

    def per_start(self) -> list[str]:
        """Each start's steps in words (``boot -> install -> run (1 checkpoint)``), oldest first."""
        return [s.render() or "(no phase reported)" for s in self._starts]

    def render(self) -> str:
        """The whole history on one line, starts numbered when there were several."""
        starts = self.per_start()
        if len(starts) <= 1:
            return "".join(starts)
        return "; ".join(f"start {n}: {s}" for n, s in enumerate(starts, 1))
