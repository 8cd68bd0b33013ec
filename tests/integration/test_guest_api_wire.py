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
from boincvm.runlocal.loopback import LoopbackProject
from boincvm.runlocal.real_client import Client
from boincvm.runlocal.request import LiveState
from boincvm.workunit.make import InputSpec
from tests.integration.jobs import SCALE
from tests.integration.test_real_client import _wait, running, signed_app_version
from tests.integration.test_run_local import app_version, data_dir, make_wu, run

pytestmark = pytest.mark.integration

# The fixtures shared with test_run_local and test_real_client (module scope: one app version each).
__all__ = ["app_version", "data_dir", "running", "signed_app_version"]

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


# -- under the real client ---------------------------------------------------------------

REAL_FAILING = (
    f"apijob.sh {STEPS} {STEP_SECONDS:.3f} 3 2",
    (InputSpec("apijob.sh", str(APIJOB)),),
)


@pytest.mark.timeout(400 * max(1.0, SCALE))
@pytest.mark.parametrize("running", [REAL_FAILING], indirect=True)
def test_real_client_trickle_up_reaches_the_project_and_finish_3_is_exit_status_3(
    running: tuple[LoopbackProject, Client],
) -> None:
    project, client = running
    _wait("the report", client, lambda: bool(project.seen.reports), 240)
    report = project.seen.reports[-1]
    assert "<exit_status>3</exit_status>" in report, report[-3000:]
    _wait("the trickle up", client, lambda: bool(project.seen.trickles), 60)
    (trickle,) = project.seen.trickles
    assert trickle["variety"] == "progress", trickle
    assert trickle["text"] == "<step>2</step>", trickle
    assert trickle["result"] == project.result_name, trickle
