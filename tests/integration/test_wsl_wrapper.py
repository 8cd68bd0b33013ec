"""The wrapper behind BOINC's wsl_wrapper (issue #28, the Linux half): started as
``./main ARGS`` by a shell in the slot, with no channel to the client, stopped, continued
and killed as a whole process group, judged by ``boinc_job_done`` alone.

The harness (:mod:`tests.wsl_wrapper`) plays wsl_wrapper from its source; QEMU guests are
real. Faults are triggered by the task's state (a committed checkpoint record in the
slot, the group's CPU time), never by a guess of how long a step takes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.workunit.make import InputSpec
from boincvm.wrapper.checkpoint import CHECKPOINT_FILE
from boincvm.wrapper.wsl_mode import LOG_FILE
from tests.integration.jobs import LongJob, bound
from tests.integration.test_run_local import app_version, make_wu, qemu_pids_under
from tests.wsl_wrapper import JobStatus, WslWrapper, busybox_root, libc_files

pytestmark = pytest.mark.integration

__all__ = ["app_version"]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[list[WslWrapper]]:
    made: list[WslWrapper] = []
    yield made
    for h in made:
        h.close()
    assert qemu_pids_under(tmp_path) == [], "a QEMU process outlived its wrapper"


def _wrapper(
    made: list[WslWrapper], wu: Path, app_version: Path, tmp_path: Path, distro: Path | None = None
) -> WslWrapper:
    data = (distro or tmp_path) / "client"
    h = WslWrapper(wu, app_version, data, distro=distro)
    h.prepare()
    made.append(h)
    return h


def _checkpoints(h: WslWrapper) -> int:
    """Checkpoints the slot's committed record counts (0 before the first)."""
    try:
        return int(json.loads((h.slot / CHECKPOINT_FILE).read_text())["checkpoints"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def _wait(what: str, h: WslWrapper, done: object, seconds: float) -> None:
    deadline = time.monotonic() + bound(seconds)
    while time.monotonic() < deadline:
        assert callable(done)
        if done():
            return
        status = h.poll()
        assert status is JobStatus.IN_PROGRESS, (
            f"the job ended ({status}) before {what}:\n{h.copy_output()!r}"
        )
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {bound(seconds):g} s")


def _group_gone(h: WslWrapper) -> None:
    deadline = time.monotonic() + bound(30)
    while h.group_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert h.group_processes() == [], "a process of the group outlived its SIGKILL"


def test_the_job_runs_to_its_output(harness: list[WslWrapper], app_version: Path, tmp_path: Path) -> None:
    job = LongJob(steps=6)
    h = _wrapper(harness, make_wu(tmp_path, job.command_line, inputs=job.inputs), app_version, tmp_path)
    h.launch()
    assert h.run(until=time.monotonic() + bound(240)) is JobStatus.SUCCESS, h.output.decode()
    assert list(h.outputs().values()) == [job.expected_out.encode()]
    assert (h.slot / "boinc_job_done").exists()
    # The log went to the slot, not into wsl_wrapper's pipe (read only at the end).
    assert "boincvm" in (h.slot / LOG_FILE).read_text()
    assert h.output == b"", h.output
    assert h.group_processes() == []


def test_kills_of_the_group_at_checkpoints_resume_byte_identical(
    harness: list[WslWrapper], app_version: Path, tmp_path: Path
) -> None:
    job = LongJob(steps=16)
    h = _wrapper(harness, make_wu(tmp_path, job.command_line, inputs=job.inputs), app_version, tmp_path)
    for n in (1, 2):
        # The Windows client quits or restarts the task: wsl_wrapper kills the group,
        # exits, and is started again later; it launches ./main anew.
        h.launch()
        _wait(f"checkpoint {n}", h, lambda n=n: _checkpoints(h) >= n, 200)
        h.abort()
        _group_gone(h)
        h.copy_output()
        assert not (h.slot / "boinc_job_done").exists()
    h.launch()
    assert h.run(until=time.monotonic() + bound(240)) is JobStatus.SUCCESS, h.output.decode()
    assert list(h.outputs().values()) == [job.expected_out.encode()]
    assert "resuming from checkpoint" in (h.slot / LOG_FILE).read_text()


def test_no_progress_while_the_group_is_stopped(
    harness: list[WslWrapper], app_version: Path, tmp_path: Path
) -> None:
    job = LongJob(steps=12)
    h = _wrapper(harness, make_wu(tmp_path, job.command_line, inputs=job.inputs), app_version, tmp_path)
    h.launch()
    _wait("a checkpoint", h, lambda: _checkpoints(h) >= 1, 200)
    h.suspend()
    deadline = time.monotonic() + bound(30)
    while not h.all_stopped() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h.all_stopped(), "the group did not stop"
    ticks = h.group_cpu_ticks()
    checkpoints = _checkpoints(h)
    time.sleep(3.0)  # an interval to observe: the assertion is that nothing moved in it
    assert h.group_cpu_ticks() == ticks, "a process of the stopped group used CPU"
    assert _checkpoints(h) == checkpoints
    h.resume()
    assert h.run(until=time.monotonic() + bound(240)) is JobStatus.SUCCESS, h.output.decode()
    assert list(h.outputs().values()) == [job.expected_out.encode()]


def test_a_failing_program_fails_where_the_server_sees_it(
    harness: list[WslWrapper], app_version: Path, tmp_path: Path
) -> None:
    # wsl_wrapper joins the arguments with spaces for a shell, quotes lost: the failing
    # command is a script, its command line plain words.
    script = tmp_path / "fail.sh"
    script.write_text("echo oops >&2\nexit 3\n")
    wu = make_wu(tmp_path, "fail.sh", inputs=(InputSpec("fail.sh", str(script)),))
    h = _wrapper(harness, wu, app_version, tmp_path)
    h.launch()
    # boinc_job_done is never touched: the wrapper ended its group before the shell could.
    assert h.run(until=time.monotonic() + bound(240)) is JobStatus.FAIL
    assert not (h.slot / "boinc_job_done").exists()
    said = h.output.decode()  # the one line wsl_wrapper passes on to the client's stderr.txt
    assert said.startswith("boincvm: the task failed with exit code 195"), said
    assert "exited with code 3" in said, said
    assert len(said.splitlines()) == 1, said
    assert h.group_processes() == []


def test_a_task_with_a_kill_runs_in_a_root_with_no_libc(
    harness: list[WslWrapper], app_version: Path, tmp_path: Path
) -> None:
    """As in BOINC's own distro (Alpine, musl) or any other: the frozen main program and the
    bundled QEMU bring what they need; the distro gives a shell, ``touch`` and a kernel."""
    distro = busybox_root(tmp_path / "distro")
    assert libc_files(distro) == []
    job = LongJob(steps=10)
    wu = make_wu(tmp_path, job.command_line, inputs=job.inputs)
    h = _wrapper(harness, wu, app_version, tmp_path, distro)
    h.launch()
    _wait("checkpoint 1", h, lambda: _checkpoints(h) >= 1, 200)
    h.abort()
    _group_gone(h)
    h.copy_output()
    h.launch()
    assert h.run(until=time.monotonic() + bound(240)) is JobStatus.SUCCESS, h.output.decode()
    assert list(h.outputs().values()) == [job.expected_out.encode()]
    assert "resuming from checkpoint" in (h.slot / LOG_FILE).read_text()
    # The bundled QEMU runtime, unpacked in the project directory, brings its own loader
    # and libraries; the distro itself still has none.
    theirs = [f for f in libc_files(distro) if not f.startswith("client/")]
    assert theirs == [], "something put a C library into the distro"
