"""The wrapper's host checks under run-local, with the real wrapper on this machine.

Here nested KVM does not work (``/dev/kvm`` exists, but a KVM guest hangs), so the real
device gives the "KVM unusable" path; a job larger than the host's memory is refused before
any QEMU process starts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest, WrapperKind
from boincvm.boinc.files import STDERR_FILE, ExitCode, read_temporary_exit
from boincvm.hypervisor.qemu.accel import TEST_DEVICE_ENV, choose_accel
from boincvm.job import OutputFile, Task, VmJob
from boincvm.runlocal.emulator import run_local
from boincvm.runlocal.request import RunLocalRequest, RunSummary
from boincvm.workunit.make import WorkunitRequest, make_workunits
from boincvm.workunit.templates import Resources
from boincvm.wrapper.hostcheck import parse_meminfo
from boincvm.wrapper.steps import VM_DIR
from tests.integration.jobs import bound

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def app_version(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The zip application: these tests are about the wrapper's decisions, not its packaging.
    out = tmp_path_factory.mktemp("av") / "app-version"
    package_image(
        AppVersionRequest(
            image=guest_image, app_name="hcheck", version="1.00", output_dir=out, wrapper=WrapperKind.PYZ
        )
    )
    return out


def make_wu(tmp_path: Path, **job: object) -> Path:
    task = Task(application="/bin/sh")
    memory = int(job.get("memory_mb", 512))  # type: ignore[call-overload]
    vm_job = VmJob(task=task, output_files=(OutputFile("out", 100_000),), **job)  # type: ignore[arg-type]
    wu = tmp_path / "wu"
    make_workunits(
        WorkunitRequest(
            app_name="hcheck",
            job=vm_job,
            output_dir=wu,
            command_line='-c "echo ok > out"',
            resources=Resources(rsc_memory_bound=(memory + 256) * 1024 * 1024),
        )
    )
    return wu


def run(wu: Path, app_version: Path, tmp_path: Path, *, max_starts: int = 20) -> tuple[RunSummary, Path]:
    data_dir = tmp_path / "client"
    summary = run_local(
        RunLocalRequest(
            workunit_dir=wu,
            app_version_dir=app_version,
            results_dir=tmp_path / "results",
            data_dir=data_dir,
            timeout=bound(240),
            max_starts=max_starts,
            keep_slot=True,
        )
    )
    (slot,) = (data_dir / "slots").iterdir()
    return summary, slot


def test_a_job_larger_than_the_host_is_refused_before_qemu_starts(app_version: Path, tmp_path: Path) -> None:
    total, _ = parse_meminfo(Path("/proc/meminfo").read_text())
    assert total is not None
    summary, slot = run(make_wu(tmp_path, memory_mb=total + 1024), app_version, tmp_path)
    assert summary.outcome == "compute_error"
    assert summary.exit_code == ExitCode.MEM_LIMIT_EXCEEDED
    assert summary.starts == 1
    stderr = (slot / STDERR_FILE).read_text()
    assert f"the job needs {total + 1024 + 256} MiB of memory" in stderr
    assert f"this host has {total} MiB in all" in stderr
    # QEMU (the trial boot of the KVM probe included) always runs in the slot's VM directory,
    # which the backend makes first: it was never made, so no QEMU process ever ran.
    assert not (slot / VM_DIR).exists()
    assert "Traceback" not in stderr


def test_run_local_shows_the_refusal_and_no_qemu_was_ever_executed(app_version: Path, tmp_path: Path) -> None:
    # The whole run-local command under strace: every program any process of the run executed
    # (the wrapper, and anything it started) is in the trace, so "no QEMU ran" is seen, not inferred.
    total, _ = parse_meminfo(Path("/proc/meminfo").read_text())
    assert total is not None
    strace = shutil.which("strace")
    assert strace is not None, "strace is part of the set-up (scripts/bootstrap.sh)"
    wu = make_wu(tmp_path, memory_mb=total + 1024)
    trace = tmp_path / "execve.trace"
    boincvm = Path(sys.executable).with_name("boincvm")
    done = subprocess.run(
        [
            strace,
            "-f",
            "-qq",
            "-e",
            "trace=execve",
            "-o",
            str(trace),
            str(boincvm),
            "run-local",
            str(wu),
            "--app-version",
            str(app_version),
            "--results",
            str(tmp_path / "results"),
            "--data-dir",
            str(tmp_path / "client"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=bound(300),
        check=False,
    )
    assert done.returncode == 8, done.stderr  # WorkunitFailed: the task ended in an error
    assert "the job needs" in done.stderr and "MiB in all" in done.stderr
    assert "Traceback" not in done.stderr
    execs = [ln for ln in trace.read_text().splitlines() if "execve(" in ln and "= 0" in ln]
    assert any("wrapper.pyz" in ln for ln in execs), "the wrapper itself must appear in the trace"
    assert not [ln for ln in execs if "qemu-system" in ln or "qemu-img" in ln]


def test_a_job_larger_than_free_memory_is_a_temporary_exit(app_version: Path, tmp_path: Path) -> None:
    total, _ = parse_meminfo(Path("/proc/meminfo").read_text())
    assert total is not None
    # Guest + QEMU's overhead is MemTotal - 1 MiB: always more than MemAvailable, never more than
    # the host has, so this is the "not now" case on any machine.
    wu = make_wu(tmp_path, memory_mb=total - 256 - 1)
    summary, slot = run(wu, app_version, tmp_path, max_starts=1)
    assert summary.outcome == "temporary_exit", summary.message
    assert "are free now" in summary.message
    temp = read_temporary_exit(slot)
    assert temp is not None and temp.delay == 600 and not temp.is_notice
    assert not (slot / VM_DIR).exists()


def test_a_job_requiring_kvm_where_it_is_unusable_is_a_temporary_exit_with_a_notice(
    app_version: Path, guest_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On this machine /dev/kvm opens but KVM guests hang (nested virtualisation): the probe's
    # bounded trial boot (cached per host) says so, and the real device is used. On a host
    # whose KVM works, a plain file stands in for the device, so the path is tested anyway.
    verdict = choose_accel(guest_image / "vmlinux", tmp_path)
    if verdict.is_kvm:
        fake = tmp_path / "kvm"
        fake.write_bytes(b"")
        monkeypatch.setenv(TEST_DEVICE_ENV, str(fake))
    summary, slot = run(make_wu(tmp_path, vm_accel_required=True), app_version, tmp_path, max_starts=1)
    assert summary.outcome == "temporary_exit", summary.message
    assert "(shown as a notice)" in summary.message
    assert "KVM is required by this job but unusable" in summary.message
    temp = read_temporary_exit(slot)
    assert temp is not None and temp.is_notice and temp.delay == 3600
    assert "fix:" in temp.reason
    if not verdict.is_kvm:
        assert verdict.reason.removesuffix(" (cached)") in temp.reason
    lines = [ln for ln in (slot / STDERR_FILE).read_text().splitlines() if "KVM is required" in ln]
    assert len(lines) == 1
    assert not list(slot.glob(f"{VM_DIR}/*.qcow2")), "no overlay: the VM was never started"


def test_unusable_kvm_runs_on_tcg_with_one_line_saying_why(
    app_version: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plain file stands in for /dev/kvm (the test hook of the probe): the "not a device" path.
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    monkeypatch.setenv(TEST_DEVICE_ENV, str(fake))
    summary, slot = run(make_wu(tmp_path), app_version, tmp_path)
    assert summary.ok, summary.message + summary.stderr_tail
    assert (tmp_path / "results/out").read_text() == "ok\n"
    lines = [ln for ln in (slot / STDERR_FILE).read_text().splitlines() if "KVM unusable" in ln]
    assert len(lines) == 1, lines
    assert f"{fake} is not a character device" in lines[0]
    assert "fix: reload the kvm module" in lines[0]
