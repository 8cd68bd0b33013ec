"""The wrapper's status file: the typed contract between the wrapper and run-local.

Not part of BOINC's protocol: the wrapper writes :class:`StatusReport` to ``boincvm_status.json``
in the slot on every phase change and progress report; run-local reads it back with
:meth:`StatusReport.read` for its live view, its fault points and its checkpoint count.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

STATUS_FILE = "boincvm_status.json"


class Phase(enum.StrEnum):
    """Where the wrapper is; written to the status file for run-local's live view."""

    BOOT = "boot"
    RESTORE = "restore"
    INSTALL = "install"
    RUN = "run"
    CHECKPOINT = "checkpoint"
    SUSPENDED = "suspended"
    COPY_OUT = "copy-out"
    CLEANUP = "cleanup"
    DONE = "done"


_PHASES = frozenset(p.value for p in Phase)

#: Trips out of ``run`` and back (a checkpoint, a suspension): not steps of their own.
EXCURSIONS = frozenset({Phase.CHECKPOINT, Phase.SUSPENDED})


@dataclass
class StatusReport:
    """What the wrapper tells run-local through ``boincvm_status.json`` (not part of BOINC's protocol).

    On disk ``phase`` and the keys of ``timings`` (seconds spent in each phase) are the
    phases' values. ``last_output`` is the guest program's latest output, whole lines, newest
    last, control characters escaped (run-local's live view shows the last few); the wrapper
    reads it from the program's output file at each progress report while the program runs
    (:mod:`.guest_output`). Between two phases ``phase`` is the one the wrapper was in before
    them (``boot`` when it was in none yet), so a reader sees ``boot -> install -> boot ->
    run`` for one boot. ``steps`` is the path itself: every step this start of the wrapper
    entered, in order, excursions aside, so a reader that looked too late for a short step
    (an install of a few milliseconds) still has it (:mod:`boincvm.runlocal.phases` shows it).
    """

    phase: Phase = Phase.BOOT
    fraction_done: float = 0.0
    cpu_time: float = 0.0
    checkpoints: int = 0
    restored_from: str | None = None
    last_output: str = ""
    accel: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    message: str = ""
    steps: list[Phase] = field(default_factory=list)

    def enter(self, phase: Phase) -> None:
        """Be in ``phase`` now; a step (not an excursion) is added to ``steps`` unless the
        wrapper is already in it."""
        self.phase = phase
        if phase not in EXCURSIONS and (not self.steps or self.steps[-1] is not phase):
            self.steps.append(phase)

    def write(self, slot_dir: Path) -> None:
        """Replace the slot's status file atomically (run-local never reads half of one).

        Raises:
            OSError: it could not be written.
        """
        path = slot_dir / STATUS_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        data = {
            **asdict(self),
            "phase": self.phase.value,
            "steps": [p.value for p in self.steps],
            "timings": {str(k): v for k, v in self.timings.items()},
        }
        tmp.write_text(json.dumps(data), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def read(cls, slot_dir: Path) -> StatusReport | None:
        """The slot's status file, or None when there is none or it is unreadable.

        Fields of the wrong type are dropped (the file is the wrapper's, but run-local must
        not trust a slot blindly), unknown ones ignored.
        """
        try:
            data = json.loads((slot_dir / STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        out = cls()
        for f in fields(cls):
            value = data.get(f.name)
            default = getattr(out, f.name)
            if f.name == "phase":
                if isinstance(value, str) and value in _PHASES:
                    out.phase = Phase(value)
            elif f.name == "steps":
                if isinstance(value, list):
                    out.steps = [Phase(v) for v in value if isinstance(v, str) and v in _PHASES]
            elif f.name == "timings":
                if isinstance(value, dict):
                    out.timings = {str(k): float(v) for k, v in value.items() if isinstance(v, int | float)}
            elif (
                isinstance(default, float) and isinstance(value, int | float) and not isinstance(value, bool)
            ):
                setattr(out, f.name, float(value))
            elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
                setattr(out, f.name, value)
            elif isinstance(value, str) and (isinstance(default, str) or f.name == "restored_from"):
                setattr(out, f.name, value)
        return out
