"""BOINC's upper_case sample in C, built -static against boincvm's guest library, run
unchanged in the bundled guest under run-local (issue #15): fraction done, operations,
a trickle up, and a kill after the first checkpoint in both checkpoint modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from boincvm import proc
from boincvm.guestapi import source, static_library
from boincvm.job import CheckpointMode
from boincvm.runlocal.faults import Fault, FaultKind
from boincvm.runlocal.request import LiveState
from boincvm.workunit.make import InputSpec
from boincvm.wrapper.steps import PROGRESS_PERIOD
from tests.integration.jobs import SCALE, task_log
from tests.integration.test_run_local import app_version, data_dir, make_wu, run

pytestmark = pytest.mark.integration

__all__ = ["app_version", "data_dir"]

UPPER_CASE_C = Path(__file__).resolve().parents[2] / "examples/upper_case/upper_case.c"
BLOCK = 64
BLOCKS = 48
# Paced by time; never shorter than four of the wrapper's progress reads, so the growing
# fraction is seen at any job scale.
STEP = max(0.25 * SCALE, 4 * PROGRESS_PERIOD / BLOCKS)
TEXT = "".join(
    f"line {i:04d} of the upper_case sample, lower case.\n" for i in range(BLOCKS * BLOCK // 46 + 1)
)
TEXT = TEXT[: BLOCKS * BLOCK]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The static upper_case executable and its input."""
    root = tmp_path_factory.mktemp("upper_case")
    library, _ = static_library()
    exe = root / "upper_case"
    include = source("boinc_api.h").parent
    proc.run(["gcc", "-static", "-O2", "-I", include, UPPER_CASE_C, library, "-o", exe], timeout=300)
    data = root / "in"
    data.write_text(TEXT)
    return exe, data


def upper_wu(
    tmp_path: Path, built: tuple[Path, Path], *, app_mode: bool = False, trickle: bool = False
) -> Path:
    exe, data = built
    run_it = f"chmod +x upper_case && exec ./upper_case {STEP:.3f} {BLOCK} 0" + (
        " trickle" if trickle else ""
    )
    job: dict[str, Any] = (
        {"checkpoint_mode": CheckpointMode.APP, "checkpoint_files": ("upper_case_state", "out")}
        if app_mode
        else {}
    )
    return make_wu(
        tmp_path,
        f"-c '{run_it}'",
        inputs=(InputSpec("upper_case", str(exe)), InputSpec("in", str(data))),
        **job,
    )


def test_upper_case_reports_progress_operations_and_a_trickle(
    app_version: Path, data_dir: Path, tmp_path: Path, built: tuple[Path, Path]
) -> None:
    seen: list[float] = []

    def on_update(state: LiveState) -> None:
        if state.phase == "run":
            seen.append(state.fraction_done)

    summary = run(
        upper_wu(tmp_path, built, trickle=True), app_version, data_dir, tmp_path, on_update=on_update
    )
    assert summary.ok, summary.message + summary.stderr_tail
    assert (tmp_path / "results/out").read_text() == TEXT.upper()
    mid = [f for f in seen if 0 < f < 1]
    assert len(set(mid)) >= 2, seen
    assert mid == sorted(mid), seen
    assert summary.ops == pytest.approx(len(TEXT) * 1e6)
    assert summary.trickles == [{"variety": "upper_case", "text": "<chars>done</chars>"}], summary.trickles


@pytest.mark.parametrize("mode", ["vm", "app"])
def test_upper_case_killed_after_the_first_checkpoint_is_byte_identical(
    app_version: Path, data_dir: Path, tmp_path: Path, built: tuple[Path, Path], mode: str
) -> None:
    fault = Fault.parse(FaultKind.KILL, "checkpoint:1")
    summary = run(upper_wu(tmp_path, built, app_mode=mode == "app"), app_version, data_dir, tmp_path, fault)
    assert summary.ok, summary.message + summary.stderr_tail
    assert summary.starts == 2, summary.events
    assert "at the program's checkpoint_ready" in task_log(summary), summary.stderr_tail
    assert (tmp_path / "results/out").read_bytes() == TEXT.upper().encode()
