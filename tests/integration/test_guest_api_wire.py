"""The wrapper's end of the guest BOINC API (issue #15) under run-local, with real guests.

The guest program is examples/apijob/apijob.sh: a job in the shape of BOINC's upper_case
sample that writes the API's files by hand (the bundled busybox guest has no guest
library), so these tests pin the wire contract itself: fraction done and operations from
``status``, app-timed checkpoints (``checkpoint_request`` / ``checkpoint_ready``), a kill
after the first checkpoint, ``finish`` with a failing status, and a trickle up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from boincvm.job import CheckpointMode
from boincvm.runlocal.faults import Fault, FaultKind
from boincvm.runlocal.request import LiveState
from boincvm.workunit.make import InputSpec
from tests.integration.jobs import SCALE
from tests.integration.test_run_local import app_version, data_dir, make_wu, run

pytestmark = pytest.mark.integration

__all__ = ["app_version", "data_dir"]  # the module-scoped fixtures, shared with test_run_local

APIJOB = Path(__file__).resolve().parents[2] / "examples/apijob/apijob.sh"
STEPS = 12
STEP_SECONDS = 1.0 * SCALE


def apijob_wu(tmp_path: Path, *, finish: int = 0, trickle_at: int = 0, app_mode: bool = False) -> Path:
    command = f"apijob.sh {STEPS} {STEP_SECONDS:.3f} {finish} {trickle_at}"
    # App mode keeps the program's own files: its checkpoint and the output it appends to.
    job: dict[str, Any] = (
        {"checkpoint_mode": CheckpointMode.APP, "checkpoint_files": ("ck", "out")} if app_mode else {}
    )
    return make_wu(tmp_path, command, inputs=(InputSpec("apijob.sh", str(APIJOB)),), **job)


def expected_out() -> str:
    steps = range(1, STEPS + 1)
    return "".join(f"step {i}\n" for i in steps) + f"sum {sum(steps)}\n"


def test_status_checkpoints_and_trickle_up(app_version: Path, data_dir: Path, tmp_path: Path) -> None:
    seen: list[float] = []

    def on_update(state: LiveState) -> None:
        if state.phase == "run":
            seen.append(state.fraction_done)

    summary = run(apijob_wu(tmp_path, trickle_at=3), app_version, data_dir, tmp_path, on_update=on_update)
    assert summary.ok, summary.message + summary.stderr_tail
    assert (tmp_path / "results/out").read_text() == expected_out()
    assert summary.ops == pytest.approx(STEPS * 1e9)
    assert summary.checkpoints >= 1
    mid = [f for f in seen if 0 < f < 1]
    assert len(set(mid)) >= 2, seen
    assert mid == sorted(mid), f"fraction done went back: {seen}"
    # The emulated client took trickle_up.xml from the slot (as BOINC's client does on the
    # have_new_trickle_up flag); run-local reports what it took.
    assert summary.trickles == [{"variety": "progress", "text": "<step>3</step>\n"}], summary.trickles


@pytest.mark.parametrize("mode", ["vm", "app"])
def test_kill_after_the_first_app_timed_checkpoint_resumes_byte_identical(
    app_version: Path, data_dir: Path, tmp_path: Path, mode: str
) -> None:
    fault = Fault.parse(FaultKind.KILL, "checkpoint:1")
    wu = apijob_wu(tmp_path, app_mode=mode == "app")
    summary = run(wu, app_version, data_dir, tmp_path, fault)
    assert summary.ok, summary.message + summary.stderr_tail
    assert summary.starts == 2, summary.events
    assert (tmp_path / "results/out").read_text() == expected_out()
    if mode == "app":
        assert "resuming from app-level checkpoint boincvm_appck" in summary.stderr_tail, summary.stderr_tail
        assert "at the program's checkpoint_ready" in summary.stderr_tail, summary.stderr_tail
    else:
        assert "resuming from checkpoint" in summary.stderr_tail, summary.stderr_tail
        assert "at the program's checkpoint_ready" in summary.stderr_tail, summary.stderr_tail


def test_boinc_finish_3_is_exit_status_3(app_version: Path, data_dir: Path, tmp_path: Path) -> None:
    summary = run(apijob_wu(tmp_path, finish=3), app_version, data_dir, tmp_path)
    assert not summary.ok
    assert summary.exit_code == 3, (summary.exit_code, summary.message, summary.stderr_tail)
