"""The real judge: Debian's boinc-client runs boincvm's signed app version and workunit.

A loopback project (tests/boinc_project.py) serves exactly what package-image and
make-workunit produced; the client fetches, verifies signatures, runs the wrapper in a
real slot with real soft links and shared memory, the wrapper boots the VM, and the
result is uploaded and reported.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest
from boincvm.job import OutputFile, Task, VmJob
from boincvm.runlocal.emulator import run_local
from boincvm.runlocal.loopback import LoopbackProject
from boincvm.runlocal.real_client import Client
from boincvm.runlocal.request import RunLocalRequest
from boincvm.signing import write_key_pair
from boincvm.workunit.make import InputSpec, WorkunitRequest, make_workunits
from boincvm.workunit.templates import Resources
from tests.integration.jobs import SCALE, LongJob, bound
from tests.integration.test_run_local import qemu_pids_under

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400 * max(1.0, SCALE))]

LONG_JOB = LongJob()
LONG = (LONG_JOB.command_line, LONG_JOB.inputs)
#: The client's checkpoint period (disk_interval): several checkpoints in any long job.
CHECKPOINT_PERIOD = LONG_JOB.seconds / 6


@pytest.fixture(scope="module")
def signed_app_version(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("signed")
    _, public = write_key_pair(root / "keys")
    av = root / "av"
    package_image(
        AppVersionRequest(
            image=guest_image,
            app_name="realtest",
            version="1.00",
            output_dir=av,
            sign_key=root / "keys/code_sign_private",
        )
    )
    return av, public


def _workunit(tmp_path: Path, command_line: str, inputs: tuple[InputSpec, ...]) -> Path:
    task = Task(
        application="/bin/sh", fraction_done_filename="fraction_done", credit_report_filename="credit_report"
    )
    wu = tmp_path / "wu"
    make_workunits(
        WorkunitRequest(
            app_name="realtest",
            job=VmJob(task=task, output_files=(OutputFile("out", 100_000),), minimum_checkpoint_interval=0),
            output_dir=wu,
            inputs=inputs,
            command_line=command_line,
            resources=Resources(rsc_memory_bound=1e9),
        )
    )
    return wu


@pytest.fixture
def running(
    signed_app_version: tuple[Path, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[LoopbackProject, Client]]:
    av, public = signed_app_version
    command_line, inputs = request.param
    project = LoopbackProject(av, _workunit(tmp_path, command_line, inputs), public).start()
    client = Client(tmp_path / "client", project, checkpoint_period=CHECKPOINT_PERIOD)
    client.start()
    try:
        yield project, client
    finally:
        client.stop()
        project.stop()
        assert qemu_pids_under(tmp_path / "client") == [], "a QEMU process outlived the task"


def _wait(what: str, client: Client, until: object, timeout: float) -> None:
    """Poll ``until`` for at most ``timeout`` seconds (at scale 1; more for longer jobs)."""
    timeout = bound(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(until) and until():
            return
        time.sleep(0.5)
    raise AssertionError(
        f"{what} did not happen within {timeout:g} s\n--- the task as boinccmd shows it: {client.tasks()}"
        f"\n--- client log tail:\n{client.log()[-4000:]}"
    )


@pytest.mark.parametrize("running", [LONG], indirect=True)
def test_real_client_runs_the_wrapper_and_uploads_the_result(running: tuple[LoopbackProject, Client]) -> None:
    project, client = running
    t0 = time.monotonic()
    seen: list[dict[str, str]] = []

    def progressed() -> bool:
        task = client.tasks()
        if task:
            seen.append(task)
        return bool(project.seen.uploads)

    _wait("the upload", client, progressed, 240)
    (name,) = project.seen.uploads
    assert project.seen.uploads[name].decode() == LONG_JOB.expected_out
    _wait("the report", client, lambda: bool(project.seen.reports), 60)
    report = project.seen.reports[-1]
    assert "<exit_status>0</exit_status>" in report
    assert client.wait_exit(60) is not None, "the client did not exit when idle"
    fractions = [float(t["fraction done"]) for t in seen if "fraction done" in t]
    cpu = [float(t["current CPU time"]) for t in seen if "current CPU time" in t]
    assert any(0 < f < 1 for f in fractions), fractions
    assert max(cpu) > 0
    assert "boincvm" in report  # the wrapper's log reached the client's stderr_txt
    # Kernel and initrd carry <gzip/>: the client fetched NAME.gz, gunzipped, checked the signature.
    assert any(name.endswith("_vm_kernel.gz") for name in project.seen.downloads), project.seen.downloads
    print(f"attach to upload: {project.seen.upload_times[name] - t0:.1f} s")


#: The job the tests interrupt once a checkpoint is committed.
LONGER_JOB = LongJob(steps=24)
LONGER = (LONGER_JOB.command_line, LONGER_JOB.inputs)


def _fraction(client: Client) -> float:
    try:
        return float(client.tasks().get("fraction done", "0"))
    except ValueError:
        return 0.0


def _checkpointed_mid_run(client: Client) -> bool:
    """The client has heard of a committed checkpoint and the job is not done yet."""
    task = client.tasks()
    try:
        checkpointed = float(task.get("CPU time at last checkpoint", "0")) > 0
        return checkpointed and 0 < float(task["fraction done"]) < 1
    except (KeyError, ValueError):
        return False


def _task_op(client: Client, project: LoopbackProject, op: str) -> None:
    out = client.cmd("--task", project.url, project.result_name, op)
    assert "error" not in out.lower(), out


def _expect_resumed_and_complete(project: LoopbackProject, client: Client) -> None:
    """The task went on from its checkpoint: every step once in the upload, and the report says so."""
    _wait("the upload", client, lambda: bool(project.seen.uploads), 240)
    (data,) = project.seen.uploads.values()
    assert data.decode() == LONGER_JOB.expected_out
    _wait("the report", client, lambda: bool(project.seen.reports), 60)
    assert "resuming from checkpoint" in project.seen.reports[-1]


@pytest.mark.parametrize("running", [LONGER], indirect=True)
def test_suspend_and_resume_through_boinccmd_keeps_the_work(running: tuple[LoopbackProject, Client]) -> None:
    project, client = running
    _wait("a checkpoint mid-run", client, lambda: _checkpointed_mid_run(client), 200)
    _task_op(client, project, "suspend")
    # With default preferences a checkpointed task is told to quit, and its VM must go.
    _wait("the wrapper to leave", client, lambda: client.tasks().get("active_task_state") != "EXECUTING", 60)
    _wait("the VM to stop", client, lambda: not qemu_pids_under(client.dir), 30)
    _task_op(client, project, "resume")
    _expect_resumed_and_complete(project, client)


@pytest.mark.parametrize("running", [LONGER], indirect=True)
def test_client_restart_resumes_from_the_checkpoint(running: tuple[LoopbackProject, Client]) -> None:
    project, client = running
    _wait("a checkpoint mid-run", client, lambda: _checkpointed_mid_run(client), 200)
    client.stop()
    assert not qemu_pids_under(client.dir)
    client.start()
    _expect_resumed_and_complete(project, client)


@pytest.mark.parametrize("running", [LONGER], indirect=True)
def test_abort_leaves_no_vm(running: tuple[LoopbackProject, Client]) -> None:
    project, client = running
    _wait("progress", client, lambda: _fraction(client) > 0.1, 200)
    assert qemu_pids_under(client.dir)
    _task_op(client, project, "abort")
    _wait("the VM to stop", client, lambda: not qemu_pids_under(client.dir), 60)
    # An aborted task is an "unrecoverable error": 7.20.5 defers the next scheduler RPC by
    # 60-110 s. "update" asks for the RPC now, as a volunteer's Update button does.
    _wait("the aborted state", client, lambda: "aborted" in client.tasks().get("state", "").lower(), 30)
    client.cmd("--project", project.url, "update")
    _wait("the report", client, lambda: bool(project.seen.reports), 60)
    assert "<exit_status>203</exit_status>" in project.seen.reports[-1]  # EXIT_ABORTED_VIA_GUI
    assert not project.seen.uploads


def test_leave_apps_in_memory_suspends_the_vm(signed_app_version: tuple[Path, Path], tmp_path: Path) -> None:
    av, public = signed_app_version
    project = LoopbackProject(av, _workunit(tmp_path, *LONGER), public).start()
    client = Client(tmp_path / "client", project, leave_apps_in_memory=True)
    client.start()
    try:
        _wait("progress", client, lambda: 0.1 < _fraction(client) < 1, 200)
        _task_op(client, project, "suspend")
        _wait("the suspension", client, lambda: client.tasks().get("active_task_state") == "SUSPENDED", 60)
        # A report sent just before the pause may still arrive: wait until the fraction holds.
        seen = [_fraction(client)]

        def steady() -> bool:
            time.sleep(1.5)
            seen.append(_fraction(client))
            return seen[-1] == seen[-2]

        _wait("the fraction done to hold still", client, steady, 60)
        pids = qemu_pids_under(client.dir)
        assert pids, "the VM should stay in memory, paused"
        # A job of 1-s steps would have moved on within 5 s had the VM not been paused.
        time.sleep(5 * LONGER_JOB.step_seconds * SCALE)
        assert _fraction(client) == seen[-1]
        _task_op(client, project, "resume")
        _wait("the upload", client, lambda: bool(project.seen.uploads), 240)
        (data,) = project.seen.uploads.values()
        assert data.decode() == LONGER_JOB.expected_out
    finally:
        client.stop()
        project.stop()
    assert qemu_pids_under(tmp_path / "client") == []


def test_run_local_with_the_real_client_matches_the_emulator(
    signed_app_version: tuple[Path, Path], tmp_path: Path
) -> None:
    from boincvm.runlocal.emulator import run_local
    from boincvm.runlocal.real_client import run_with_boinc_client
    from boincvm.runlocal.request import RunLocalRequest

    av, _ = signed_app_version
    wu = _workunit(tmp_path, *LONG)
    real = run_with_boinc_client(
        RunLocalRequest(
            workunit_dir=wu, app_version_dir=av, results_dir=tmp_path / "real", data_dir=tmp_path / "d1"
        )
    )
    emulated = run_local(
        RunLocalRequest(
            workunit_dir=wu, app_version_dir=av, results_dir=tmp_path / "emu", data_dir=tmp_path / "d2"
        )
    )
    assert real.ok and emulated.ok, (real.message, emulated.message)
    assert (tmp_path / "real/out").read_bytes() == (tmp_path / "emu/out").read_bytes()
    assert real.cpu_time > 0
    print(f"under the real client {real.elapsed:.1f} s, under run-local {emulated.elapsed:.1f} s")


#: Asks for a temporary exit once (the guest keeps a marker), then writes an output big
#: enough (over 8 KB) that the client asks the upload handler for its size first.
TEMPORARY_EXIT_SCRIPT = (
    "if [ ! -e /tmp/asked ]; then : > /tmp/asked; printf '5\\n\\ncome back later\\n' > tx; sleep 5; fi\n"
    "seq 1 15000 > out\n"
)


def test_temporary_exit_is_honoured_and_a_large_output_uploads(
    signed_app_version: tuple[Path, Path], tmp_path: Path
) -> None:
    av, public = signed_app_version
    script = tmp_path / "tx.sh"
    script.write_text(TEMPORARY_EXIT_SCRIPT)
    task = Task(application="/bin/sh", temporary_exit_trigger_file="tx")
    make_workunits(
        WorkunitRequest(
            app_name="realtest",
            job=VmJob(task=task, output_files=(OutputFile("out", 100_000),), minimum_checkpoint_interval=0),
            output_dir=tmp_path / "wu",
            inputs=(InputSpec("tx.sh", str(script)),),
            command_line="tx.sh",
            resources=Resources(rsc_memory_bound=1e9),
        )
    )
    project = LoopbackProject(av, tmp_path / "wu", public).start()
    client = Client(tmp_path / "client", project)
    client.start()
    try:
        _wait(
            "the postponement",
            client,
            lambda: "postponed for 5 seconds: come back later" in client.log(),
            120,
        )
        assert not qemu_pids_under(client.dir), "the VM must be off while the task waits"
        # 7.20.5 restarts a postponed task at its next scheduling pass (about 60 s), not after 5 s.
        _wait("the upload", client, lambda: bool(project.seen.uploads), 180)
        _wait("the report", client, lambda: bool(project.seen.reports), 60)
    finally:
        client.stop()
        project.stop()
    (data,) = project.seen.uploads.values()
    assert data == "".join(f"{i}\n" for i in range(1, 15001)).encode()
    assert project.seen.size_queries == list(project.seen.uploads)
    report = project.seen.reports[-1]
    assert "<exit_status>0</exit_status>" in report
    assert "resuming from checkpoint" in report
    assert qemu_pids_under(tmp_path / "client") == []


#: XML-special characters, quotes inside and around arguments, and an empty quoted argument
#: (which the 7.20.5 client does not close: it runs to the end of the line).
ARGS_LINE = 'args.sh "two words" plain a&b <lt> x"y z" "" end'


def test_the_guest_gets_the_same_arguments_as_under_run_local(
    signed_app_version: tuple[Path, Path], tmp_path: Path
) -> None:
    av, public = signed_app_version
    script = tmp_path / "args.sh"
    script.write_text('for a in "$@"; do printf "[%s]\\n" "$a"; done > out\n')
    make_workunits(
        WorkunitRequest(
            app_name="realtest",
            job=VmJob(task=Task(application="/bin/sh"), output_files=(OutputFile("out", 100_000),)),
            output_dir=tmp_path / "wu",
            inputs=(InputSpec("args.sh", str(script)),),
            command_line=ARGS_LINE,
            resources=Resources(rsc_memory_bound=1e9),
        )
    )
    project = LoopbackProject(av, tmp_path / "wu", public).start()
    client = Client(tmp_path / "client", project)
    client.start()
    try:
        _wait("the upload", client, lambda: bool(project.seen.uploads), 180)
    finally:
        client.stop()
        project.stop()
    (real,) = project.seen.uploads.values()
    emulated = run_local(
        RunLocalRequest(
            workunit_dir=tmp_path / "wu",
            app_version_dir=av,
            results_dir=tmp_path / "emu",
            data_dir=tmp_path / "d",
        )
    )
    assert emulated.ok, emulated.message
    assert real.decode().splitlines() == [
        "[two words]",
        "[plain]",
        "[a&b]",
        "[<lt>]",
        '[x"y]',
        '[z"]',
        '[" end ]',
    ]
    assert (tmp_path / "emu/out").read_bytes() == real
