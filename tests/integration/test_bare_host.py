"""The proof on a bare, older volunteer host: Debian 11 (glibc 2.31) with only boinc-client 7.16.

The root (tests/bare_host.py) has no Python and no QEMU. Its own ``boinc`` runs inside it
(chroot in a private mount namespace) against the loopback project on 127.0.0.1; the
signed app version package-image makes by default (frozen wrapper, bundled QEMU) is all it
gets. The client downloads it, runs the workunit, uploads; the result must equal
run-local's on this machine; a client stopped after a checkpoint resumes from it; a
suspended task keeps its work; and the QEMU that ran is the app version's own.

Two controls: the root is Debian 11 with client 7.16 and no python or qemu, and a
zip-application wrapper fails there for want of python3. A run that fails names why: a glibc
too old for the main program (:class:`GlibcTooOld`) or no QEMU found (:class:`NoQemu`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest, WrapperKind
from boincvm.runlocal.emulator import run_local
from boincvm.runlocal.loopback import LoopbackProject
from boincvm.runlocal.real_client import Client
from boincvm.runlocal.request import RunLocalRequest
from boincvm.signing import write_key_pair
from boincvm.unpacked import MANIFEST, WRAPPER
from boincvm.wrapper.status import Phase, StatusReport
from tests.bare_host import DATA_DIRS, BareHost, build_root, foreign_tools
from tests.integration.jobs import SCALE, LongJob
from tests.integration.test_real_client import _checkpointed_mid_run, _fraction, _task_op, _wait, _workunit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900 * max(1.0, SCALE))]

LONG_JOB = LongJob()
LONGER_JOB = LongJob(steps=24)
#: The client's checkpoint period (disk_interval): several checkpoints in the longer job.
CHECKPOINT_PERIOD = LONGER_JOB.seconds / 6


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> BareHost:
    """A private copy of the cached bullseye root (the cache itself is never written)."""
    host = BareHost.copy_of(build_root(), tmp_path_factory.mktemp("bare") / "root")
    assert foreign_tools(host.root) == [], "the bare host must have no python and no qemu"
    return host


def _signed(root: Path, guest_image: Path, **options: object) -> tuple[Path, Path]:
    _, public = write_key_pair(root / "keys")
    av = root / "av"
    package_image(
        AppVersionRequest(
            image=guest_image,
            app_name="realtest",
            version="1.00",
            output_dir=av,
            sign_key=root / "keys/code_sign_private",
            **options,  # type: ignore[arg-type]
        )
    )
    return av, public


@pytest.fixture(scope="module")
def signed_app_version(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """package-image's default app version for QEMU, signed."""
    return _signed(tmp_path_factory.mktemp("signed"), guest_image)


def qemu_in(root: Path) -> dict[int, Path]:
    """QEMU processes running inside ``root`` (their /proc/PID/root), with their executables."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "root").readlink() != root.resolve():
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            exe = (entry / "exe").readlink()
        except OSError:
            continue
        # Through the bundled loader, argv[0] may be the loader and QEMU a later argument.
        if any(Path(a.decode("utf-8", "replace")).name.startswith("qemu-system") for a in argv):
            found[int(entry.name)] = exe
    return found


def processes_in(root: Path) -> list[int]:
    """Every process whose root is ``root``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "root").readlink() == root.resolve():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def on_bare_host(
    bare: BareHost, signed_app_version: tuple[Path, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[LoopbackProject, Client]]:
    """The client in the bare root against a loopback project serving ``request.param`` (a LongJob)."""
    av, public = signed_app_version
    job: LongJob = request.param
    project = LoopbackProject(av, _workunit(tmp_path, job.command_line, job.inputs), public).start()
    client = Client(
        bare.data_dir(tmp_path.name),
        project,
        checkpoint_period=CHECKPOINT_PERIOD,
        launcher=bare.launcher,
    )
    client.start()
    try:
        yield project, client
    finally:
        client.stop()
        project.stop()
    _wait("every process in the bare root to end", client, lambda: not processes_in(bare.root), 30)


def test_the_bare_host_is_debian_11_without_python_or_qemu(bare: BareHost) -> None:
    out = bare.run(
        "sh",
        "-c",
        "ldd --version; boinc --version; for t in python3 python qemu-system-x86_64 qemu-img; "
        'do command -v "$t" || echo "no $t"; done',
    ).text
    assert "GLIBC 2.31" in out, out
    assert "7.16.16" in out, out
    assert [line for line in out.splitlines() if line.startswith("no ")] == [
        "no python3",
        "no python",
        "no qemu-system-x86_64",
        "no qemu-img",
    ], out
    assert foreign_tools(bare.root) == []
    assert processes_in(bare.root) == []
    # The mounts were made in a private namespace: none is left on this host.
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    assert [m for m in mounts if str(bare.root) in m] == []


class NotSelfContained(AssertionError):
    """The app version needed something the bare host does not have."""


class GlibcTooOld(NotSelfContained):
    """The main program could not start: it needs a newer glibc than the bare host's 2.31."""


class NoQemu(NotSelfContained):
    """The wrapper started but found no QEMU: the app version does not bring its own."""


def _failure(project: LoopbackProject, client: Client) -> str:
    """The failed task's report, asked for at once: its stderr.txt, or the whole report if none."""
    # A failed task is reported after a back-off of 1-2 min; "update" asks for the RPC now.
    client.cmd("--project", project.url, "update")
    _wait("the report of the failed task", client, lambda: bool(project.seen.reports), 60)
    report = project.seen.reports[-1]
    assert "<exit_status>0</exit_status>" not in report
    found = re.search(r"<stderr_txt>(.*)</stderr_txt>", report, re.S)
    return found.group(1) if found else report


def _until(
    what: str, project: LoopbackProject, client: Client, until: Callable[[], bool], seconds: float
) -> None:
    """Wait for ``until``, or fail at once (with the task's stderr) if the task errs."""

    def done() -> bool:
        return until() or "error" in client.tasks().get("state", "").lower()

    _wait(what, client, done, seconds)
    if until():
        return
    stderr = _failure(project, client)
    if re.search(r"GLIBC_[0-9.]+' not found", stderr):
        raise GlibcTooOld(stderr[-2000:])
    if re.search(r"qemu-(system-x86_64|img) was not found", stderr):
        raise NoQemu(stderr[-2000:])
    raise AssertionError(f"the task failed on the bare host before {what}:\n{stderr[-3000:]}")


@pytest.mark.parametrize("on_bare_host", [LONG_JOB], indirect=True)
def test_the_app_version_runs_on_the_bare_host_as_under_run_local(
    on_bare_host: tuple[LoopbackProject, Client], bare: BareHost, tmp_path: Path
) -> None:
    project, client = on_bare_host
    t0 = time.monotonic()
    qemu: dict[int, Path] = {}

    def progressed() -> bool:
        qemu.update(qemu_in(bare.root))
        return bool(project.seen.uploads)

    _until("the upload", project, client, progressed, 300)
    _wait("the report", client, lambda: bool(project.seen.reports), 60)
    bare_seconds = time.monotonic() - t0
    report = project.seen.reports[-1]
    assert "<exit_status>0</exit_status>" in report, report[-3000:]
    assert "libc 2.31" in project.seen.requests[0]  # the client told the scheduler where it ran
    (data,) = project.seen.uploads.values()
    assert data.decode() == LONG_JOB.expected_out
    # The QEMU that ran is the app version's own, unpacked in the client's data directory.
    assert qemu, "no QEMU process was seen in the bare root"
    for exe in qemu.values():
        assert exe.is_relative_to(client.dir), f"QEMU ran from {exe}, outside the app version"
    # ... and nothing was installed on the host outside the client's data directories.
    assert foreign_tools(bare.root, skip=(bare.root / DATA_DIRS,)) == []
    # The first task of the app version on this host ran the static wrapper, which left the
    # wrapper's runtime unpacked in the project directory for the tasks after it.
    assert "static executable" in report and "unpacked the wrapper's runtime" in report, report[-3000:]
    assert list(client.dir.glob(f"projects/*/{WRAPPER.prefix}*/{MANIFEST}")), "the runtime was not unpacked"

    t1 = time.monotonic()
    local = run_local(
        RunLocalRequest(
            workunit_dir=project.wud.path,
            app_version_dir=project.av,
            results_dir=tmp_path / "local",
            data_dir=tmp_path / "d",
        )
    )
    local_seconds = time.monotonic() - t1
    assert local.ok, local.message
    assert (tmp_path / "local/out").read_bytes() == data
    print(
        f"bare host (client 7.16 in the bullseye root, attach to report) {bare_seconds:.1f} s, "
        f"run-local {local_seconds:.1f} s, ratio {bare_seconds / local_seconds:.2f}"
    )


def _statuses(client: Client) -> list[StatusReport]:
    """The wrapper's status in each of the client's slots."""
    found = (StatusReport.read(slot) for slot in sorted((client.dir / "slots").glob("*")))
    return [s for s in found if s is not None]


@pytest.mark.parametrize("on_bare_host", [LONGER_JOB], indirect=True)
def test_a_client_restart_on_the_bare_host_resumes_from_the_checkpoint(
    on_bare_host: tuple[LoopbackProject, Client], bare: BareHost
) -> None:
    project, client = on_bare_host
    # (fraction done, checkpoints committed) as the wrapper wrote them before the stop. A
    # checkpoint committed after a sample holds at least that sample's fraction done.
    before: list[tuple[float, int]] = []

    def checkpointed_well_into_the_job() -> bool:
        before.extend((s.fraction_done, s.checkpoints) for s in _statuses(client) if s.phase == Phase.RUN)
        latest = before[-1][1] if before else 0
        return _checkpointed_mid_run(client) and any(f >= 0.25 and n < latest for f, n in before)

    _until("a checkpoint a quarter into the job", project, client, checkpointed_well_into_the_job, 300)
    client.stop()
    assert not qemu_in(bare.root)
    (stopped,) = _statuses(client)
    at_least = max(f for f, n in before if n < stopped.checkpoints)
    client.start()
    # Had the task started over, the wrapper would report the first steps again (1/24, 2/24, ...);
    # right after the restore it writes 0 until its first poll of the guest.
    after: list[float] = []

    def progressed() -> bool:
        after.extend(
            s.fraction_done
            for s in _statuses(client)
            if s.phase == Phase.RUN and s.restored_from and s.fraction_done > 0
        )
        return bool(project.seen.uploads)

    _until("the upload", project, client, progressed, 300)
    assert after, "the wrapper's status was never seen after the restart"
    assert min(after) >= at_least >= 0.25, (at_least, after)
    (data,) = project.seen.uploads.values()
    assert data.decode() == LONGER_JOB.expected_out
    _wait("the report", client, lambda: bool(project.seen.reports), 60)
    assert "resuming from checkpoint" in project.seen.reports[-1]
    # The first start unpacked the wrapper's runtime (its quit waits for that); the restart ran it.
    assert "from the wrapper's runtime" in project.seen.reports[-1], project.seen.reports[-1][-3000:]


@pytest.fixture
def in_memory(bare: BareHost, signed_app_version: tuple[Path, Path], tmp_path: Path) -> Iterator[Client]:
    """The longer job under a client that keeps suspended tasks in memory."""
    av, public = signed_app_version
    project = LoopbackProject(av, _workunit(tmp_path, LONGER_JOB.command_line, LONGER_JOB.inputs), public)
    project.start()
    client = Client(bare.data_dir(tmp_path.name), project, leave_apps_in_memory=True, launcher=bare.launcher)
    client.start()
    try:
        yield client
    finally:
        client.stop()
        project.stop()
    _wait("every process in the bare root to end", client, lambda: not processes_in(bare.root), 30)


def test_suspend_and_resume_on_the_bare_host_keeps_the_work(in_memory: Client, bare: BareHost) -> None:
    client = in_memory
    project = client.project
    _until("progress", project, client, lambda: 0.2 < _fraction(client) < 0.8, 300)
    _task_op(client, project, "suspend")
    _wait("the suspension", client, lambda: client.tasks().get("active_task_state") == "SUSPENDED", 60)
    seen = [_fraction(client)]

    def steady() -> bool:
        time.sleep(1.5)
        seen.append(_fraction(client))
        return seen[-1] == seen[-2]

    _wait("the fraction done to hold still", client, steady, 60)
    suspended_at = seen[-1]
    assert qemu_in(bare.root), "the VM should stay in memory, paused"
    _task_op(client, project, "resume")
    after: list[float] = []

    def progressed() -> bool:
        task = client.tasks()
        if task.get("active_task_state") == "EXECUTING" and "fraction done" in task:
            after.append(float(task["fraction done"]))
        return bool(project.seen.uploads)

    _until("the upload", project, client, progressed, 300)
    assert after and min(after) >= suspended_at, (suspended_at, after)
    (data,) = project.seen.uploads.values()
    assert data.decode() == LONGER_JOB.expected_out


def test_a_zipapp_wrapper_cannot_start_on_the_bare_host(
    bare: BareHost, guest_image: Path, tmp_path: Path
) -> None:
    """The control: the same kind of workunit with the zip-application wrapper fails, for want of Python."""
    av, public = _signed(tmp_path / "pyz", guest_image, wrapper=WrapperKind.PYZ)
    project = LoopbackProject(av, _workunit(tmp_path, "longjob.sh 2 0.1 0 sleep", LONG_JOB.inputs), public)
    project.start()
    client = Client(bare.data_dir(tmp_path.name), project, launcher=bare.launcher)
    client.start()
    try:
        _wait("the task to fail", client, lambda: "error" in client.tasks().get("state", "").lower(), 120)
        stderr = _failure(project, client)
    finally:
        client.stop()
        project.stop()
    assert "<exit_status>127</exit_status>" in project.seen.reports[-1]  # env's "command not found"
    # The zip application's "#!/usr/bin/env python3" line, as the slot's stderr.txt caught it.
    assert "python3" in stderr and "No such file or directory" in stderr, stderr
    # The client told the scheduler where it runs.
    assert "Debian GNU/Linux 11 (bullseye)" in project.seen.requests[0]
    assert "libc 2.31" in project.seen.requests[0]
    assert not project.seen.uploads
    # 7.16 took the signed files, the kernel as NAME.gz (gunzipped before the signature check).
    assert any(name.endswith("_vm_kernel.gz") for name in project.seen.downloads), project.seen.downloads
