"""The tests' long job, paced by time on the guest's clock, never by how fast the guest computes.

``BOINCVM_TEST_JOB_SCALE`` (a positive factor, default 1) stretches every long job: 0.25
makes each four times shorter, 4 four times longer. Tests must stay green at any scale; a
test that needs a fault mid-run asks run-local for a progress point or a checkpoint count,
and every wait on an event is bounded by :func:`bound`, which grows with the scale.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from boincvm.runlocal.request import RunSummary
from boincvm.workunit.make import InputSpec

LONGJOB = Path(__file__).resolve().parents[2] / "examples/longjob/program/bin/longjob"


def _scale() -> float:
    raw = os.environ.get("BOINCVM_TEST_JOB_SCALE", "1")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise RuntimeError(f"BOINCVM_TEST_JOB_SCALE={raw!r}: give a positive factor such as 0.25 or 4")
    return value


SCALE = _scale()


def bound(seconds: float) -> float:
    """A generous bound for a wait that takes about ``seconds`` at scale 1."""
    return seconds * max(1.0, SCALE)


def task_log(summary: RunSummary) -> str:
    """The task's stderr.txt as run-local kept it (the client's last 63 KiB), for assertions
    on what the wrapper logged: the summary's own tail is 4,000 characters, and on a slower
    host more checkpoints (more log lines) push a resume line out of it."""
    path = Path(summary.results_dir) / "stderr.txt"
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return summary.stderr_tail


@dataclass(frozen=True)
class LongJob:
    """``longjob.sh STEPS STEP_SECONDS BULK_KIB MODE`` in the guest (examples/longjob).

    ``spin`` keeps a guest core busy for the step's time (for tests that measure CPU);
    otherwise the job sleeps. Either way a step lasts ``step_seconds * SCALE`` of guest time.
    """

    steps: int = 12
    step_seconds: float = 1.0
    bulk_kib: int = 0
    spin: bool = False

    @property
    def seconds(self) -> float:
        """How long the job runs, at the current scale."""
        return self.steps * self.step_seconds * SCALE

    @property
    def command_line(self) -> str:
        mode = "spin" if self.spin else "sleep"
        return f"longjob.sh {self.steps} {self.step_seconds * SCALE:.3f} {self.bulk_kib} {mode}"

    @property
    def inputs(self) -> tuple[InputSpec, ...]:
        return (InputSpec("longjob.sh", str(LONGJOB)),)

    @property
    def expected_out(self) -> str:
        """Every step once, then the sum: a repeated or lost step shows."""
        steps = range(1, self.steps + 1)
        return "".join(f"step {i}\n" for i in steps) + f"sum {sum(steps)}\n"

    @property
    def ops(self) -> float:
        """The operations count the job reports at the end."""
        return self.steps * 1e9
