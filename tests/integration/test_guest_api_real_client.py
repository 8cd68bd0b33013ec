"""BOINC's upper_case sample in C, built -static against boincvm's guest library, under
Debian's real boinc client (issue #15): the client is stopped and started again after it
has heard of a committed checkpoint, in both checkpoint modes, and the uploaded output is
byte-identical to an uninterrupted run's. The job went on from its checkpoint: the
wrapper's log in the reported stderr says so, and in app mode the program itself, started
again in a fresh VM, says where it resumed (its stderr tail reaches the wrapper's log).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from boincvm.job import CheckpointMode, OutputFile, Task, VmJob
from boincvm.runlocal.loopback import LoopbackProject
from boincvm.runlocal.real_client import Client
from boincvm.workunit.make import InputSpec, WorkunitRequest, make_workunits
from boincvm.workunit.templates import Resources
from tests.integration.jobs import SCALE
from tests.integration.test_guest_api_upper_case import BLOCK, TEXT, built
from tests.integration.test_real_client import _checkpointed_mid_run, _wait, signed_app_version
from tests.integration.test_run_local import qemu_pids_under

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400 * max(1.0, SCALE))]

# The fixtures shared with test_guest_api_upper_case and test_real_client (module scope).
__all__ = ["built", "signed_app_version"]

#: Seconds per block of BLOCK bytes: the whole job lasts about 24 s of guest time.
STEP = 24 * SCALE * BLOCK / len(TEXT)
#: The client's checkpoint period (disk_interval): several checkpoints before the job ends.
CHECKPOINT_PERIOD = 24 * SCALE / 6


def _workunit(tmp_path: Path, built: tuple[Path, Path], app_mode: bool) -> Path:
    exe, data = built
    job: dict[str, Any] = (
        {"checkpoint_mode": CheckpointMode.APP, "checkpoint_files": ("upper_case_state", "out")}
        if app_mode
        else {}
    )
    task = Task(application="/bin/sh")
    wu = tmp_path / "wu"
    make_workunits(
        WorkunitRequest(
            app_name="realtest",
            job=VmJob(
                task=task, output_files=(OutputFile("out", 100_000),), minimum_checkpoint_interval=0, **job
            ),
            output_dir=wu,
            inputs=(InputSpec("upper_case", str(exe)), InputSpec("in", str(data))),
            command_line=f"-c 'chmod +x upper_case && exec ./upper_case {STEP:.3f} {BLOCK} 0'",
            resources=Resources(rsc_memory_bound=1e9),
        )
    )
    return wu


@pytest.fixture(params=["vm", "app"])
def running(
    signed_app_version: tuple[Path, Path],
    built: tuple[Path, Path],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[str, LoopbackProject, Client]]:
    av, public = signed_app_version
    mode = request.param
    project = LoopbackProject(av, _workunit(tmp_path, built, mode == "app"), public).start()
    client = Client(tmp_path / "client", project, checkpoint_period=CHECKPOINT_PERIOD)
    client.start()
    try:
        yield mode, project, client
    finally:
        client.stop()
        project.stop()
        assert qemu_pids_under(tmp_path / "client") == [], "a QEMU process outlived the task"


def test_client_restart_after_a_checkpoint_resumes_upper_case_byte_identical(
    running: tuple[str, LoopbackProject, Client],
) -> None:
    mode, project, client = running
    _wait("a checkpoint mid-run", client, lambda: _checkpointed_mid_run(client), 200)
    client.stop()
    assert not qemu_pids_under(client.dir), "the VM outlived the stopped client"
    client.start()
    _wait("the upload", client, lambda: bool(project.seen.uploads), 240)
    (data,) = project.seen.uploads.values()
    assert data == TEXT.upper().encode()
    _wait("the report", client, lambda: bool(project.seen.reports), 60)
    report = project.seen.reports[-1]
    assert "<exit_status>0</exit_status>" in report, report[-3000:]
    if mode == "app":
        assert "resuming from app-level checkpoint" in report, report[-3000:]
        # The program ran again from its own checkpoint, not from byte 0.
        resumed = [int(n) for n in re.findall(r"upper_case: resuming at byte (\d+)", report)]
        assert resumed and all(0 < n < len(TEXT) for n in resumed), report[-3000:]
    else:
        # The VM came back from its snapshot with the program mid-run: it never started again.
        assert "resuming from checkpoint" in report, report[-3000:]
        assert "upper_case: resuming at byte" not in report, report[-3000:]
