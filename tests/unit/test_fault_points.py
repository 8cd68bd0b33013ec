"""run-local's WHEN grammar: seconds, phases, progress points and checkpoint counts."""

from __future__ import annotations

import pytest

from boincvm.errors import InputError
from boincvm.runlocal.faults import Fault, FaultKind
from boincvm.runlocal.request import LiveState
from boincvm.wrapper.status import Phase


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("30", Fault(FaultKind.SUSPEND, seconds=30)),
        ("run+5", Fault(FaultKind.SUSPEND, seconds=5, phase=Phase.RUN)),
        ("run+2:5", Fault(FaultKind.SUSPEND, seconds=2, phase=Phase.RUN, duration=5)),
        ("checkpoint", Fault(FaultKind.SUSPEND, phase=Phase.CHECKPOINT)),
        ("checkpoint+0:5", Fault(FaultKind.SUSPEND, phase=Phase.CHECKPOINT, duration=5)),
        ("progress:0.3", Fault(FaultKind.SUSPEND, progress=0.3)),
        ("progress:1", Fault(FaultKind.SUSPEND, progress=1.0)),
        ("progress:0.5+2", Fault(FaultKind.SUSPEND, seconds=2, progress=0.5)),
        ("progress:0.3:5", Fault(FaultKind.SUSPEND, progress=0.3, duration=5)),
        ("checkpoint:2", Fault(FaultKind.SUSPEND, checkpoints=2)),
        ("checkpoint:2+1:7", Fault(FaultKind.SUSPEND, seconds=1, checkpoints=2, duration=7)),
    ],
)
def test_when_forms(spec: str, expected: Fault) -> None:
    assert Fault.parse(FaultKind.SUSPEND, spec) == expected


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("progress:0", "above 0 and at most 1"),
        ("progress:1.5", "above 0 and at most 1"),
        ("checkpoint:0", "whole number from 1"),
        ("checkpoint:1.5", "whole number from 1"),
        ("progress:", "not a WHEN"),
        ("", "not a WHEN"),
        ("1..2", "not a number"),
        ("bogus+1", "unknown phase 'bogus'"),
    ],
)
def test_bad_when_is_refused_with_a_hint(spec: str, says: str) -> None:
    with pytest.raises(InputError) as refused:
        Fault.parse(FaultKind.KILL, spec)
    assert says in refused.value.message
    assert f"--kill-at {spec!r}" in refused.value.message
    assert refused.value.hint


def test_points_are_reached_by_progress_and_checkpoints_not_by_time() -> None:
    live = LiveState(phase=Phase.RUN, fraction_done=0.29, checkpoints=1)
    assert Fault.parse(FaultKind.KILL, "30").point_reached(live) is None  # the start: a time
    assert Fault.parse(FaultKind.KILL, "run").point_reached(live) is True
    assert Fault.parse(FaultKind.KILL, "progress:0.3").point_reached(live) is False
    assert Fault.parse(FaultKind.KILL, "checkpoint:2").point_reached(live) is False
    live.fraction_done, live.checkpoints = 0.3, 2
    assert Fault.parse(FaultKind.KILL, "progress:0.3").point_reached(live) is True
    assert Fault.parse(FaultKind.KILL, "checkpoint:2").point_reached(live) is True
