"""BOINC's upper_case sample in Python (examples/upper_case/upper_case.py, ``import boinc``),
run unchanged by the python3 of a Debian container image under run-local (issue #15): the
image build adds ``boinc.py`` to the image's dist-packages. Fraction done and operations,
a kill after the first checkpoint in both checkpoint modes, and ``boinc_finish(3)``."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest, app_version_defaults
from boincvm.image.container import build_container_image
from boincvm.job import CheckpointMode, OutputFile, Task, VmJob
from boincvm.runlocal.emulator import run_local
from boincvm.runlocal.faults import Fault, FaultKind
from boincvm.runlocal.request import LiveState, RunLocalRequest, RunSummary
from boincvm.workunit.make import InputSpec, WorkunitRequest, make_workunits
from boincvm.workunit.templates import Resources
from tests.integration.jobs import SCALE, bound, task_log
from tests.integration.test_guest_api_upper_case import BLOCK, TEXT
from tests.oci_images import M, debian_rootfs_tar, layer_tar, umoci_layout

pytestmark = pytest.mark.integration

UPPER_CASE_PY = Path(__file__).resolve().parents[2] / "examples/upper_case/upper_case.py"
STEP = 0.25 * SCALE
#: About a sixth of the job: the client asks for a checkpoint a few times along the way.
CHECKPOINT_PERIOD = max(1.0, len(TEXT) / BLOCK * STEP / 6)


@pytest.fixture(scope="module")
def py_app_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Debian image with python3 whose program is upper_case.py, as an app version."""
    work = tmp_path_factory.mktemp("pyguest")
    layout = umoci_layout(
        work / "layout",
        debian_rootfs_tar(),
        "--config.entrypoint=/usr/bin/python3",
        "--config.cmd=/app/upper_case.py",
        "--config.workingdir=/app",
    )
    layer = work / "app.tar"
    layer.write_bytes(
        layer_tar(
            [
                M("app", "dir", mode=0o755),
                M("app/upper_case.py", data=UPPER_CASE_PY.read_bytes(), mode=0o755),
            ]
        )
    )
    subprocess.run(
        ["umoci", "raw", "add-layer", "--image", f"{layout}:latest", str(layer)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    image = build_container_image(layout, output=work / "image")  # umoci's layout is new each run
    out = work / "av"
    package_image(AppVersionRequest(image=image, app_name="pyupper", version="1.00", output_dir=out))
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("pyguest-in") / "in"
    data.write_text(TEXT)
    return data


def run_upper(
    av: Path,
    text_file: Path,
    tmp_path: Path,
    *faults: Fault,
    finish: int = 0,
    app_mode: bool = False,
    on_update: Callable[[LiveState], None] | None = None,
) -> RunSummary:
    job: dict[str, Any] = (
        {"checkpoint_mode": CheckpointMode.APP, "checkpoint_files": ("upper_case_state", "out")}
        if app_mode
        else {}
    )
    vm_job = VmJob(
        task=Task(),
        output_files=(OutputFile("out", 100_000),),
        minimum_checkpoint_interval=0,
        **job,
    )
    wu = tmp_path / "wu"
    make_workunits(
        WorkunitRequest(
            app_name="pyupper",
            job=vm_job,
            output_dir=wu,
            inputs=(InputSpec("in", str(text_file)),),
            command_line=f"/app/upper_case.py {STEP:.3f} {BLOCK} {finish}",  # replaces the Cmd
            resources=Resources(rsc_memory_bound=1e9),
            defaults=app_version_defaults(av),
        )
    )
    return run_local(
        RunLocalRequest(
            workunit_dir=wu,
            app_version_dir=av,
            results_dir=tmp_path / "results",
            data_dir=tmp_path / "client",
            faults=faults,
            timeout=bound(300),
            checkpoint_period=CHECKPOINT_PERIOD,
        ),
        on_update,
    )


def test_python_upper_case_reports_progress_and_operations(
    py_app_version: Path, text_file: Path, tmp_path: Path
) -> None:
    seen: list[float] = []

    def on_update(state: LiveState) -> None:
        if state.phase == "run":
            seen.append(state.fraction_done)

    summary = run_upper(py_app_version, text_file, tmp_path, on_update=on_update)
    assert summary.ok, summary.message + summary.stderr_tail
    assert (tmp_path / "results/out").read_bytes() == TEXT.upper().encode()
    mid = [f for f in seen if 0 < f < 1]
    assert len(set(mid)) >= 2, seen
    assert mid == sorted(mid), f"fraction done went back: {seen}"
    assert summary.ops == pytest.approx(len(TEXT) * 1e6)


@pytest.mark.parametrize("mode", ["vm", "app"])
def test_python_upper_case_killed_after_the_first_checkpoint_is_byte_identical(
    py_app_version: Path, text_file: Path, tmp_path: Path, mode: str
) -> None:
    fault = Fault.parse(FaultKind.KILL, "checkpoint:1")
    summary = run_upper(py_app_version, text_file, tmp_path, fault, app_mode=mode == "app")
    assert summary.ok, summary.message + summary.stderr_tail
    assert summary.starts == 2, summary.events
    assert "at the program's checkpoint_ready" in task_log(summary), summary.stderr_tail
    assert (tmp_path / "results/out").read_bytes() == TEXT.upper().encode()


def test_python_boinc_finish_3_is_exit_status_3(
    py_app_version: Path, text_file: Path, tmp_path: Path
) -> None:
    summary = run_upper(py_app_version, text_file, tmp_path, finish=3)
    assert not summary.ok
    assert summary.exit_code == 3, (summary.exit_code, summary.message, summary.stderr_tail)
