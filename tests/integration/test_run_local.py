"""The wrapper end to end under run-local: real QEMU guests, real processes, real faults.

Every test makes a workunit with make_workunits, runs the app version's own wrapper (the
frozen executable package-image built; one test the zip application) through the client
emulator, and checks the BOINC outcome, the results and that no QEMU process is left.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest, RuntimeKind, WrapperKind
from boincvm.job import BackendOption, OutputFile, Task, VmJob
from boincvm.runlocal.emulator import run_local
from boincvm.runlocal.faults import Fault, FaultKind
from boincvm.runlocal.request import LiveState, RunLocalRequest, RunSummary
from boincvm.workunit.make import InputSpec, WorkunitRequest, make_workunits
from boincvm.workunit.templates import Resources
from tests.integration.jobs import LongJob, bound, task_log

pytestmark = pytest.mark.integration

#: The long job of these tests: 12 steps of 1 s on the guest's clock (times the scale).
LONG = LongJob()
#: Checkpoints every sixth of the job, so several land in it at any scale (but no more
#: often than once a second: a snapshot takes a few tenths of a second under TCG).
CHECKPOINT_PERIOD = max(1.0, LONG.seconds / 6)
#: The job the fault tests interrupt: long enough at a quarter of the scale for the
#: wrapper's once-a-second status to show it mid-run.
FAULTED = LongJob(steps=20)


@pytest.fixture(scope="module")
def app_version(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("av") / "app-version"
    package_image(AppVersionRequest(image=guest_image, app_name="itest", version="1.00", output_dir=out))
    return out


#: The wrapper's first log line names the form it runs in.
FORM = r"boincvm-wrapper \S+, (static executable|from the wrapper's runtime)"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One emulated client for the module, as a volunteer's client keeps its project files.
    return tmp_path_factory.mktemp("client")


def qemu_pids_under(root: Path) -> list[int]:
    """QEMU processes whose working directory is below ``root`` (the backend runs QEMU in the slot)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            cwd = str((entry / "cwd").readlink())
        except OSError:
            continue
        # argv[0] is QEMU, or the bundled loader with QEMU a few arguments later.
        if any(b"qemu-system" in a for a in cmd.split(b"\0")[:4]) and cwd.startswith(str(root)):
            pids.append(int(entry.name))
    return pids


def make_wu(
    tmp_path: Path,
    command_line: str,
    *,
    inputs: tuple[InputSpec, ...] = (),
    outputs: tuple[OutputFile, ...] = (OutputFile("out", 100_000),),
    **job: object,
) -> Path:
    task = Task(
        application="/bin/sh",
        fraction_done_filename="fraction_done",
        credit_report_filename="credit_report",
    )
    vm_job = VmJob(task=task, output_files=outputs, minimum_checkpoint_interval=0, **job)  # type: ignore[arg-type]
    wu = tmp_path / "wu"
    make_workunits(
        WorkunitRequest(
            app_name="itest",
            job=vm_job,
            output_dir=wu,
            inputs=inputs,
            command_line=command_line,
            resources=Resources(rsc_memory_bound=1e9),
        )
    )
    return wu


def run(
    wu: Path,
    app_version: Path,
    data_dir: Path,
    tmp_path: Path,
    *faults: Fault,
    on_update: Callable[[LiveState], None] | None = None,
    checkpoint_period: float = CHECKPOINT_PERIOD,
) -> RunSummary:
    summary = run_local(
        RunLocalRequest(
            workunit_dir=wu,
            app_version_dir=app_version,
            results_dir=tmp_path / "results",
            data_dir=data_dir,
            faults=faults,
            timeout=bound(240),
            checkpoint_period=checkpoint_period,
        ),
        on_update,
    )
    assert qemu_pids_under(data_dir) == [], "a QEMU process outlived its wrapper"
    return summary


def longjob_wu(tmp_path: Path, job: LongJob = LONG) -> Path:
    outputs: tuple[OutputFile, ...] = (OutputFile("out", 100_000),)
    if job.bulk_kib:
        outputs += (OutputFile("bulk", 10_000_000),)
    return make_wu(tmp_path, job.command_line, inputs=job.inputs, outputs=outputs)


def _main_program(app_version: Path) -> Path:
    from boincvm.appversion.model import parse_version_xml

    vx, _ = parse_version_xml((app_version / "version.xml").read_bytes())
    (main,) = [f for f in vx.files if f.main_program]
    return app_version / main.physical_name


@pytest.mark.parametrize("wrapper", [WrapperKind.FROZEN, WrapperKind.PYZ])
def test_hello(
    wrapper: WrapperKind, app_version: Path, guest_image: Path, data_dir: Path, tmp_path: Path
) -> None:
    if wrapper is WrapperKind.PYZ:
        app_version = tmp_path / "av-pyz"
        package_image(
            AppVersionRequest(
                image=guest_image, app_name="itest", version="1.00", output_dir=app_version, wrapper=wrapper
            )
        )
    # The frozen wrapper's main program is its /bin/sh launcher; the zip application's, itself.
    head = _main_program(app_version).read_bytes()[:10]
    assert head == (b"#!/bin/sh\n" if wrapper is WrapperKind.FROZEN else b"#!/usr/bin")
    (tmp_path / "world.txt").write_text("world\n")
    wu = make_wu(
        tmp_path, '-c "tr a-z A-Z < in > out"', inputs=(InputSpec("in", str(tmp_path / "world.txt")),)
    )
    summary = run(wu, app_version, data_dir, tmp_path)
    assert summary.ok, summary.message + summary.stderr_tail
    assert summary.outcome == "success"
    assert summary.exit_code == 0
    assert (tmp_path / "results/out").read_text() == "WORLD\n"
    assert summary.starts == 1
    assert summary.cpu_time > 0


def test_backend_options_reach_the_vm(app_version: Path, data_dir: Path, tmp_path: Path) -> None:
    # microvm has no PCI bus: the guest's own view proves the job's machine option was used.
    options = (BackendOption("machine", "microvm"), BackendOption("golden", "no"))
    wu = make_wu(tmp_path, '-c "ls /sys/bus/pci/devices | wc -l > out"', backend_options=options)
    summary = run(wu, app_version, data_dir, tmp_path)
    assert summary.ok, summary.message + summary.stderr_tail
    assert (tmp_path / "results/out").read_text().strip() == "0"


def test_long_job_uninterrupted_checkpoints_and_reports(
    app_version: Path, data_dir: Path, tmp_path: Path
) -> None:
    seen: list[float] = []
    summary = run(
        longjob_wu(tmp_path),
        app_version,
        data_dir,
        tmp_path,
        on_update=lambda s: seen.append(s.fraction_done),
    )
    assert summary.ok, summary.message + summary.stderr_tail
    assert (tmp_path / "results/out").read_text() == LONG.expected_out
    assert summary.checkpoints >= 1
    assert summary.ops == pytest.approx(LONG.ops)
    assert any(0 < f < 1 for f in seen), "fraction done was never forwarded mid-run"


@pytest.mark.parametrize(
    ("kind", "when"),
    [
        (FaultKind.KILL, "boot"),
        (FaultKind.KILL, "progress:0.5"),
        (FaultKind.KILL, "checkpoint"),  # in the middle of taking a snapshot
        (FaultKind.KILL, "checkpoint:1"),
        (FaultKind.KILL, "copy-out"),
        (FaultKind.QUIT, "progress:0.5"),
    ],
)
def test_long_job_survives_faults(
    app_version: Path,
    tmp_path: Path,
    kind: FaultKind,
    when: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A host that has not run this app version yet: the first start is the static wrapper,
    # which unpacks the wrapper's runtime while the task runs (tests/unit covers later hosts).
    data_dir = tmp_path / "client"
    # The static wrapper's staticx unpacks into TMPDIR: a kill leaves its directory there.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    unpacked: set[str] = set()
    progress: list[tuple[int, float]] = []  # (start, fraction done) as the status file said

    def watch(state: LiveState) -> None:
        unpacked.update(p.name for p in tmp.glob("staticx-*"))
        progress.append((state.starts, state.fraction_done))

    job = LongJob(steps=FAULTED.steps, bulk_kib=2048) if when == "copy-out" else FAULTED
    fault = Fault.parse(kind, when)
    summary = run(longjob_wu(tmp_path, job), app_version, data_dir, tmp_path, fault, on_update=watch)
    assert summary.ok, summary.message + summary.stderr_tail
    # The form each start ran in: the static wrapper first; the second start runs the runtime
    # if the first lived long enough to unpack it (a quit waits for that), else static again.
    forms = re.findall(FORM, task_log(summary))
    assert len(forms) == 2 and forms[0] == "static executable", forms
    if kind is FaultKind.QUIT:
        assert forms[1] == "from the wrapper's runtime", forms
    # One unpacked staticx directory per static start; whichever form the second start ran in,
    # it removed the one the kill left behind.
    assert len(unpacked) == forms.count("static executable"), (unpacked, forms)
    assert list(tmp.glob("staticx-*")) == []
    injected = [e for e in summary.events if f"injected {kind.value}" in e]
    assert injected, summary.events
    assert summary.starts == 2, summary.events
    assert (tmp_path / "results/out").read_text() == job.expected_out
    if when.startswith(("progress:", "checkpoint:")):
        # Mid-run, whatever the host's speed: the program was running (or being snapshotted).
        assert re.search(r"\(phase (run|checkpoint), \d+% done", injected[0]), injected
    if kind is FaultKind.KILL and when == "progress:0.5":
        # Checkpoints every sixth of the job: one past 0 % was committed before half-way,
        # and the resumed task says its fraction at once, never 0 % (progress going back).
        assert "resuming from checkpoint" in task_log(summary), summary.stderr_tail
        resumed = [f for start, f in progress if start == 2]
        assert resumed and min(resumed) > 0, progress
    if when == "checkpoint:1":
        # A checkpoint was committed before the kill, and the second start went on from it.
        assert "resuming from checkpoint" in task_log(summary), summary.stderr_tail


def test_abort_exits_194_and_stops_the_vm(app_version: Path, data_dir: Path, tmp_path: Path) -> None:
    summary = run(
        longjob_wu(tmp_path), app_version, data_dir, tmp_path, Fault.parse(FaultKind.ABORT, "progress:0.25")
    )
    assert summary.outcome == "aborted"
    assert summary.exit_code == 194
    assert not summary.ok


def test_heartbeat_loss_stops_wrapper_and_vm_within_35s(
    app_version: Path, data_dir: Path, tmp_path: Path
) -> None:
    marks: dict[str, float] = {}

    def watch(state: LiveState) -> None:
        if any("heartbeat-loss" in e for e in state.events) and "lost" not in marks:
            marks["lost"] = time.monotonic()
        if "lost" in marks and "exited" not in marks and any("wrapper exited" in e for e in state.events):
            marks["exited"] = time.monotonic()
            marks["qemu_left"] = float(len(qemu_pids_under(data_dir)))

    wu = make_wu(tmp_path, "-c 'sleep 40; echo done > out'")
    summary = run(
        wu, app_version, data_dir, tmp_path, Fault.parse(FaultKind.HEARTBEAT_LOSS, "run+1"), on_update=watch
    )
    assert "exited" in marks, summary.events
    assert marks["exited"] - marks["lost"] <= 35.0
    assert marks["qemu_left"] == 0
    assert summary.ok, (
        summary.message + summary.stderr_tail
    )  # restarted and finished once heartbeats came back


def _qemu_cpu(data_dir: Path) -> float:
    total = 0.0
    for pid in qemu_pids_under(data_dir):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def test_suspend_stops_guest_progress_and_cpu(app_version: Path, data_dir: Path, tmp_path: Path) -> None:
    samples: list[tuple[float, str, float, float]] = []

    def watch(state: LiveState) -> None:
        samples.append((time.monotonic(), state.phase, _qemu_cpu(data_dir), state.fraction_done))

    # The CPU-bound variant: QEMU keeps a core busy while the job runs, so idling shows.
    job = LongJob(spin=True)
    summary = run(
        longjob_wu(tmp_path, job),
        app_version,
        data_dir,
        tmp_path,
        Fault.parse(FaultKind.SUSPEND, "progress:0.25:5"),
        on_update=watch,
    )
    assert summary.ok, summary.message + summary.stderr_tail
    suspended = [s for s in samples if s[1] == "suspended"]
    assert len(suspended) >= 8, "the wrapper never reported the suspension"
    # Leave the first and last sample out: pausing and resuming take a moment.
    window = suspended[2:-1]
    duration = window[-1][0] - window[0][0]
    cpu = window[-1][2] - window[0][2]
    assert duration > 2.5
    assert cpu < 0.1 * duration, f"QEMU used {cpu:.2f} s of CPU in {duration:.1f} s while suspended"
    assert len({s[3] for s in window}) == 1, f"the guest made progress while suspended: {window}"
    assert (tmp_path / "results/out").read_text() == job.expected_out


def test_program_failure_is_a_compute_error(app_version: Path, data_dir: Path, tmp_path: Path) -> None:
    summary = run(make_wu(tmp_path, "-c 'echo oops >&2; exit 3'"), app_version, data_dir, tmp_path)
    assert summary.outcome == "compute_error"
    assert "exited with code 3" in summary.message
    assert "exited with code 3" in task_log(summary)


def test_output_over_max_nbytes_fails(app_version: Path, data_dir: Path, tmp_path: Path) -> None:
    wu = make_wu(tmp_path, "-c 'seq 1 1000 > out'", outputs=(OutputFile("out", 100),))
    summary = run(wu, app_version, data_dir, tmp_path)
    assert summary.outcome == "compute_error"
    assert "out" in summary.message and "100" in summary.message
    assert not (tmp_path / "results/out").exists()


def test_missing_output_fails(app_version: Path, data_dir: Path, tmp_path: Path) -> None:
    summary = run(make_wu(tmp_path, "-c 'true'"), app_version, data_dir, tmp_path)
    assert summary.outcome == "compute_error"
    assert "out" in summary.message


def test_result_path_escaping_the_job_directory_is_refused(
    app_version: Path, data_dir: Path, tmp_path: Path
) -> None:
    wu = make_wu(tmp_path, "-c 'echo x > /etc/x'")
    # Tamper with the staged job file as a hostile or broken server-side tool might.
    job_file = next(p for p in (wu / "download").iterdir() if p.suffix == ".xml")
    job_file.write_text(
        job_file.read_text().replace(
            "<open_name>out</open_name>", "<open_name>out</open_name><guest_name>../../etc/x</guest_name>"
        )
    )
    summary = run(wu, app_version, data_dir, tmp_path)
    assert summary.outcome == "compute_error"
    assert "leaves its directory" in summary.message


def test_package_that_fails_to_install(app_version: Path, data_dir: Path, tmp_path: Path) -> None:
    # make-workunit refuses an unreadable package itself, so a broken one can only reach the
    # wrapper by being swapped in the project's download directory (a broken server-side
    # tool, a half-synced mirror): the wrapper checks it again before the guest sees it.
    from boincvm.package.build import PackageRequest, build_package

    program = tmp_path / "program"
    (program / "bin").mkdir(parents=True)
    (program / "bin/x").write_text("#!/bin/sh\n")
    built = build_package(PackageRequest(program, "x", "1.0"), tmp_path)
    wu = tmp_path / "wu2"
    make_workunits(
        WorkunitRequest(
            app_name="itest",
            job=VmJob(task=Task(application="/bin/true"), output_files=(OutputFile("out", 10),)),
            output_dir=wu,
            package=built.path,
            resources=Resources(rsc_memory_bound=1e9),
        )
    )
    (staged,) = [p for p in (wu / "download").iterdir() if p.suffix == ".rpm"]
    staged.write_bytes(b"\xed\xab\xee\xdb" + os.urandom(2000))
    summary = run(wu, app_version, data_dir, tmp_path)
    assert summary.outcome == "compute_error"
    assert "package" in summary.message


def test_image_without_guest_tools(guest_image: Path, data_dir: Path, tmp_path: Path) -> None:
    import subprocess

    blank = tmp_path / "blank.img"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(blank), "64M"], check=True, capture_output=True)
    av = tmp_path / "av-blank"
    package_image(
        AppVersionRequest(image=blank, app_name="itest", version="1.00", output_dir=av, memory_mb=128)
    )
    wu = make_wu(tmp_path, "-c 'true'", boot_timeout=10)
    summary = run(wu, av, data_dir, tmp_path)
    assert summary.outcome == "compute_error"
    assert "guest tools did not answer" in summary.message


def test_unrestorable_checkpoint_starts_the_job_afresh(
    app_version: Path, data_dir: Path, tmp_path: Path
) -> None:
    import json

    from boincvm.boinc.client import ClientOptions, LocalClient
    from boincvm.runlocal.task import build_task
    from boincvm.wrapper.checkpoint import CHECKPOINT_FILE

    wu = longjob_wu(tmp_path)
    req = RunLocalRequest(
        workunit_dir=wu, app_version_dir=app_version, results_dir=tmp_path / "results", data_dir=data_dir
    )
    task = build_task(req)
    with LocalClient(
        data_dir, task, slot=7, options=ClientOptions(checkpoint_period=1.0, poll_period=0.2)
    ) as client:
        client.start()
        record = client.slot_dir / CHECKPOINT_FILE
        client.wait(bound(120), until=lambda _: record.exists())
        client.quit()
        first = client.wait(60)
        assert first is not None and first.will_restart
        data = json.loads(record.read_text())
        data["snapshot"] = "lost-in-a-crash"
        record.write_text(json.dumps(data))
        client.start()
        final = client.wait(bound(180))
        assert final is not None and final.ok, final
        assert "cannot be restored" in final.stderr_tail
        (out,) = [o for o in final.outputs if o.name.endswith("_0")]
        assert out.path.read_text() == LONG.expected_out
    assert qemu_pids_under(data_dir) == []


def test_missing_hypervisor_is_a_clear_init_failure(
    guest_image: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import sys

    # --runtime system: the host's QEMU (an app version with the bundled runtime needs none).
    app_version = tmp_path / "av-system"
    package_image(
        AppVersionRequest(
            image=guest_image,
            app_name="itest",
            version="1.00",
            output_dir=app_version,
            runtime=RuntimeKind.SYSTEM,
        )
    )

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    for tool in ("setpriv", "sh"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))  # a host without QEMU
    summary = run(make_wu(tmp_path, "-c 'true'"), app_version, data_dir, tmp_path)
    assert summary.outcome == "compute_error"
    assert summary.exit_code == 206
    assert "qemu-system-x86_64 was not found" in summary.message
