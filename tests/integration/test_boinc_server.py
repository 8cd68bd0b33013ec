"""What an administrator makes goes through BOINC's own server to validated, assimilated results.

BOINC's server, built from its source (tests/boinc_server.py), runs a project made by
``make_project`` on 127.0.0.1. boincvm's artefacts enter it only the way an administrator's
would: ``package-image`` signs with the project's own ``crypt_prog`` key, ``boincvm deploy``
(run as the project's unprivileged owner) installs them with the project's tools, and the
project's daemons (feeder, transitioner, ``sample_bitwise_validator``,
``sample_dummy_assimilator``) do the rest. Two real clients run at once: Debian 12's 7.20.5 on
this host and Debian 11's 7.16.16 in the bare root of tests/bare_host.py. Every verdict is read
from the project's database and files, never from our own logs.

The project's config says ``one_result_per_host_per_wu``, so a workunit's replicas go to
different hosts (as on a real project with many hosts) and a reissued task to the other client.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from boincvm import proc
from boincvm.job import OutputFile, Task, VmJob
from boincvm.runlocal.real_client import Client
from boincvm.workunit.directory import open_workunit_dir
from boincvm.workunit.make import InputSpec
from boincvm.workunit.templates import Resources
from boincvm.wrapper.status import Phase, StatusReport
from tests.bare_host import BareHost, build_root
from tests.boinc_admin import (
    APP,
    CLIENT_ERROR,
    OVER,
    SUCCESS,
    VALID,
    Admin,
    app_version_ids,
    assimilated,
    hello,
    make_toolkit,
    results,
    upload,
    workunit,
)
from tests.boinc_server import BoincServer, running_server
from tests.example_hello import boincvm_cli, hello_workunits
from tests.integration.jobs import SCALE, LongJob, bound
from tests.integration.test_run_local import qemu_pids_under

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3600 * max(1.0, SCALE))]

#: The wrapper's exit status for a failed guest program or a bad output (EXIT_CHILD_FAILED).
EXIT_CHILD_FAILED = 195
#: The client's exit status for a task aborted by the user.
EXIT_ABORTED_VIA_GUI = 203
#: An entry the project had before deploy merged ours: it must survive.
OTHER_PLAN_CLASS = (
    "<plan_classes>\n    <plan_class>\n        <name>mt</name>\n        <min_ncpus>2</min_ncpus>\n"
    "    </plan_class>\n</plan_classes>\n"
)


@pytest.fixture(scope="module")
def admin() -> Iterator[Admin]:
    """The project with both app versions of ``hello`` deployed, and its validator and assimilator."""
    with running_server(name="boincvm") as server:
        server.set_config(one_result_per_host_per_wu="1")
        work = server.state / "admin"
        work.mkdir(mode=0o755)
        (server.root / "plan_class_spec.xml").write_text(OTHER_PLAN_CLASS)
        os.chown(server.root / "plan_class_spec.xml", server.user.pw_uid, server.user.pw_gid)
        yield Admin(server, work, make_toolkit(server.state / "toolkit"))


@pytest.fixture(scope="module")
def app_versions(admin: Admin, guest_image: Path) -> tuple[Path, Path]:
    """The plain app version and one that needs KVM (plan class vm_kvm), signed with the project's key."""
    key = admin.server.root / "keys" / "code_sign_private"
    plain, kvm = admin.work / "av", admin.work / "av_kvm"
    for out, extra in ((plain, ()), (kvm, ("--plan-class", "vm_kvm", "--require-kvm"))):
        args = ("--app", APP, "--version", "1.00", "--sign-key", str(key), *extra, "-o", str(out))
        boincvm_cli("package-image", str(guest_image), *args)
    return plain, kvm


@dataclass(frozen=True)
class Deployed:
    """What the administrator saw while deploying both app versions."""

    dry_run: proc.Completed
    before: list[str]  # the project's apps/ right after the dry run
    first: proc.Completed
    again: proc.Completed


@pytest.fixture(scope="module")
def deployed(admin: Admin, app_versions: tuple[Path, Path]) -> Deployed:
    """Both app versions deployed (after a dry run), deployed again, and the app's daemons started."""
    server = admin.server
    plain, kvm = app_versions
    dry = admin.deploy("--dry-run", str(plain), str(kvm))
    before = sorted(p.name for p in (server.root / "apps").iterdir())
    first = admin.deploy(str(plain), str(kvm))
    again = admin.deploy(str(plain), str(kvm), "--json")
    server.add_daemon(f"sample_bitwise_validator -d 3 --app {APP} --sleep_interval 1")
    server.add_daemon(f"sample_dummy_assimilator -d 3 --app {APP} --sleep_interval 1", start=True)
    return Deployed(dry, before, first, again)


@dataclass
class Volunteer:
    """A real client attached to the project with an account of its own."""

    name: str
    client: Client[BoincServer]
    slots: Path
    userid: int
    bare: BareHost | None = None

    def hostid(self) -> int:
        return _hostid(self.client.project, self.userid)


def _hostid(server: BoincServer, userid: int) -> int:
    rows = server.query(f"SELECT id FROM host WHERE userid = {userid}")
    return int(rows[0][0] or 0) if rows else 0


#: The clients' checkpoint period (disk_interval): several checkpoints in a long job.
CHECKPOINT_PERIOD = 4.0


@pytest.fixture(scope="module")
def volunteers(
    admin: Admin, deployed: Deployed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Volunteer]]:
    """Debian 12's client on this host and Debian 11's in the bare root, both running."""
    server = admin.server
    bare = BareHost.copy_of(build_root(), tmp_path_factory.mktemp("bare") / "root")
    found: dict[str, Volunteer] = {}
    for name, launcher_host in (("debian12", None), ("debian11", bare)):
        auth = server.create_account(f"{name}@example.com", name, f"{name} passwd")
        ((userid,),) = server.query(f"SELECT id FROM user WHERE authenticator = '{auth}'")
        if launcher_host is None:
            data = tmp_path_factory.mktemp(name)
            client = Client(data, server, authenticator=auth, checkpoint_period=CHECKPOINT_PERIOD)
        else:
            data = launcher_host.data_dir(name)
            client = Client(
                data,
                server,
                authenticator=auth,
                checkpoint_period=CHECKPOINT_PERIOD,
                launcher=launcher_host.launcher,
            )
        found[name] = Volunteer(name, client, data / "slots", int(userid or 0), launcher_host)
    for v in found.values():
        v.client.start(exit_when_idle=False)
    try:
        for v in found.values():
            server.wait_for(f"{v.name}'s first scheduler request", v.hostid, timeout=bound(300))
        yield found
    finally:
        for v in found.values():
            v.client.stop()
    for v in found.values():
        assert not qemu_pids_under(v.slots), f"a VM outlived {v.name}'s client"


def test_deploy_installs_both_app_versions_with_the_projects_own_tools(
    admin: Admin, deployed: Deployed
) -> None:
    server = admin.server
    assert deployed.before == [], "the dry run changed the project"
    assert (
        "would" in deployed.dry_run.stderr.decode() and "nothing changed" in deployed.dry_run.stderr.decode()
    )
    ids = app_version_ids(server)
    assert sorted(ids) == ["", "vm_kvm"], ids
    platform_dirs = sorted(p.name for p in (server.root / "apps" / APP / "1.00").iterdir())
    assert platform_dirs == ["x86_64-pc-linux-gnu", "x86_64-pc-linux-gnu__vm_kvm"]
    # Exactly the files version.xml names (and their signatures): no summary, no plan-class entry.
    for d in platform_dirs:
        names = [p.name for p in (server.root / "apps" / APP / "1.00" / d).iterdir()]
        assert not [n for n in names if n.startswith(".") or "boincvm-app-version" in n], names
    assert not list((server.root / "download").glob("*boincvm-app-version*"))
    spec = (server.root / "plan_class_spec.xml").read_text()
    assert (
        "<name>mt</name>" in spec
        and "<name>vm_kvm</name>" in spec
        and "<cpu_feature>vmx</cpu_feature>" in spec
    )
    # Run again: every step found done, nothing ran.
    again = deployed.again.stdout.decode()
    assert '"ok": true' in again and '"needed": true' not in again, again
    assert "0 steps ran" in deployed.again.stderr.decode()


def test_the_example_runs_to_a_valid_assimilated_result(
    admin: Admin, volunteers: dict[str, Volunteer]
) -> None:
    server = admin.server
    wu_dir = hello(admin, "wu-example")
    out = admin.deploy(str(wu_dir))
    assert "bin/create_work: 1 workunits" in out.stderr.decode(), out.stderr.decode()
    (name,) = [r.name for r in open_workunit_dir(wu_dir).records()]
    server.wait_for("the example assimilated", lambda: assimilated(server, name), timeout=bound(600))
    wu = workunit(server, name)
    (result,) = [r for r in results(server, name) if r["id"] == wu["canonical_resultid"]]
    assert (result["server_state"], result["outcome"], result["validate_state"]) == (
        str(OVER),
        str(SUCCESS),
        str(VALID),
    )
    assert float(result["granted_credit"] or 0) > 0
    assert upload(server, str(result["name"])) == b"Hello, world!\n"
    # The scheduler chose the plain app version: this host has no vmx, and it says so.
    assert int(result["app_version_id"] or 0) == app_version_ids(server)[""]
    log = server.scheduler_log()
    assert re.search(r"plan_class_spec: CPU lacks feature ' ?vmx ?'", log), log[-20000:]
    assert "app_plan(vm_kvm) returned false" in log


def test_deploy_of_workunits_is_idempotent_and_refuses_what_would_never_run(
    admin: Admin, deployed: Deployed
) -> None:
    server = admin.server
    wu_dir = hello(admin, "wu-twice", name="twice_0")
    admin.deploy(str(wu_dir))
    again = admin.deploy(str(wu_dir))
    assert "0 steps ran" in again.stderr.decode(), again.stderr.decode()
    assert server.query("SELECT count(*) FROM workunit WHERE name = 'twice_0'") == [("1",)]
    # The project's own record of it gone, create_work's refusal is named clearly.
    (server.root / ".boincvm" / "submitted").unlink()
    dup = admin.deploy(str(wu_dir), check=False)
    assert dup.returncode == 3, dup.stderr.decode()
    assert "the project already has a workunit named twice_0" in dup.stderr.decode()
    # Workunits for an app the project does not have: refused before anything is copied.
    typo = hello_workunits(admin.work, "wu-typo", app="helo", name="typo_0")
    before = sorted((server.root / "templates").iterdir())
    refused = admin.deploy(str(typo), check=False)
    assert refused.returncode == 3
    assert (
        "are for app 'helo', which has no app version in the project (it has: hello)"
        in refused.stderr.decode()
    )
    assert "Traceback" not in refused.stderr.decode()
    assert sorted((server.root / "templates").iterdir()) == before
    # As root in a project another user owns: refused, with the command that works.
    as_root = proc.run(
        [sys.executable, "-m", "boincvm", "deploy", str(server.root), str(wu_dir)], timeout=300, check=False
    )
    assert as_root.returncode == 3
    assert f"runuser -u {server.user.pw_name} -- boincvm deploy" in as_root.stderr.decode()


def test_create_work_sh_submits_on_its_own(admin: Admin, deployed: Deployed) -> None:
    server = admin.server
    wu_dir = hello(admin, "wu-script", name="script_0")
    done = proc.run(server.as_user(["sh", str(wu_dir / "create_work.sh"), str(server.root)]), timeout=600)
    assert server.query("SELECT count(*) FROM workunit WHERE name = 'script_0'") == [("1",)], done.text
    templates = sorted(p.name for p in (server.root / "templates").glob("hello_*_*.xml"))
    assert templates, "the templates went in without a content hash in their names"


def test_a_batch_with_quorum_two_validates_bitwise_across_two_real_clients(
    admin: Admin, volunteers: dict[str, Volunteer]
) -> None:
    server = admin.server
    names = admin.work / "names"
    names.mkdir()
    rows = ["file"]
    for i in range(20):
        (names / f"n{i:02}.txt").write_text(f"volunteer {i}\n")
        rows.append(f"names/n{i:02}.txt")
    (admin.work / "batch.csv").write_text("\n".join(rows) + "\n")
    wu_dir = hello(
        admin,
        "wu-batch",
        input_path="{{ file }}",
        batch=str(admin.work / "batch.csv"),
        name="batch_{{ index }}",
        min_quorum="2",
        target_nresults="2",
    )
    admin.deploy(str(wu_dir))
    wus = [f"batch_{i}" for i in range(20)]
    server.wait_for("20 workunits assimilated", lambda: assimilated(server, *wus), timeout=bound(1500))
    hosts = {v.hostid(): v.name for v in volunteers.values()}
    kvm = app_version_ids(server)["vm_kvm"]
    for i, wu in enumerate(wus):
        canonical = workunit(server, wu)["canonical_resultid"]
        assert canonical and canonical != "0", wu
        done = [r for r in results(server, wu) if r["outcome"] == str(SUCCESS)]
        assert len(done) == 2 and {int(r["hostid"] or 0) for r in done} == set(hosts), (wu, done)
        assert all(r["validate_state"] == str(VALID) for r in done), (wu, done)
        assert all(int(r["app_version_id"] or 0) != kvm for r in done)
        for r in done:
            assert upload(server, str(r["name"])) == f"Hello, volunteer {i}!\n".encode()


def _slot_of(v: Volunteer, wu: str) -> Path | None:
    for slot in sorted(v.slots.glob("*")):
        with contextlib.suppress(OSError):
            if f"<wu_name>{wu}</wu_name>" in (slot / "init_data.xml").read_text():
                return slot
    return None


def _checkpointed(v: Volunteer, wu: str, at_least: float) -> bool:
    slot = _slot_of(v, wu)
    status = StatusReport.read(slot) if slot is not None else None
    return (
        status is not None
        and status.phase == Phase.RUN
        and status.checkpoints >= 1
        and status.fraction_done >= at_least
    )


def _kill_session(client: Client[BoincServer]) -> None:
    """SIGKILL the client and everything it started, as a power cut would (QEMU included)."""
    assert client.proc is not None
    sid = client.proc.pid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, ProcessLookupError):
                if int((entry / "stat").read_text().rpartition(")")[2].split()[3]) == sid:
                    os.kill(int(entry.name), signal.SIGKILL)
    client.proc.wait(30)


def _long_job_wu(admin: Admin, name: str, job: LongJob, resources: Resources) -> Path:
    task = Task(
        application="/bin/sh", fraction_done_filename="fraction_done", credit_report_filename="credit_report"
    )
    return admin.workunits(
        name,
        VmJob(task=task, output_files=(OutputFile("out", 100_000),), minimum_checkpoint_interval=0),
        job.inputs,
        command_line=job.command_line,
        resources=resources,
        name=name,
    )


def test_a_killed_client_resumes_from_its_checkpoint_and_agrees_bitwise(
    admin: Admin, volunteers: dict[str, Volunteer]
) -> None:
    server = admin.server
    job = LongJob(steps=24)
    quorum = Resources(rsc_memory_bound=1e9, min_quorum=2, target_nresults=2, max_success_results=2)
    admin.deploy(str(_long_job_wu(admin, "resume_0", job, quorum)))
    host = volunteers["debian12"]
    server.wait_for(
        "a checkpoint a quarter into the job on Debian 12's client",
        lambda: _checkpointed(host, "resume_0", 0.25),
        timeout=bound(600),
        interval=0.5,
    )
    _kill_session(host.client)
    assert not qemu_pids_under(host.slots), "a VM outlived its killed client"
    host.client.start(exit_when_idle=False)
    server.wait_for(
        "the resumed job assimilated", lambda: assimilated(server, "resume_0"), timeout=bound(900)
    )
    done = {int(r["hostid"] or 0): r for r in results(server, "resume_0") if r["outcome"] == str(SUCCESS)}
    assert set(done) == {v.hostid() for v in volunteers.values()}, done
    assert all(r["validate_state"] == str(VALID) for r in done.values())
    resumed = done[host.hostid()]
    assert "resuming from checkpoint" in str(resumed["stderr_out"]), resumed["stderr_out"]
    outputs = {upload(server, str(r["name"])) for r in done.values()}
    assert outputs == {job.expected_out.encode()}


def test_an_aborted_task_is_reissued_and_finished_by_the_other_client(
    admin: Admin, volunteers: dict[str, Volunteer]
) -> None:
    server = admin.server
    job = LongJob(steps=12)
    single = Resources(rsc_memory_bound=1e9)
    admin.deploy(str(_long_job_wu(admin, "abort_0", job, single)))

    def running_somewhere() -> tuple[Volunteer, str] | None:
        for v in volunteers.values():
            slot = _slot_of(v, "abort_0")
            status = StatusReport.read(slot) if slot is not None else None
            if status is not None and status.phase == Phase.RUN:
                rows = [r for r in results(server, "abort_0") if int(r["hostid"] or 0) == v.hostid()]
                return (v, str(rows[0]["name"])) if rows else None
        return None

    found = server.wait_for("the task running on a client", running_somewhere, timeout=bound(600))
    assert found is not None
    first, result = found
    out = first.client.cmd("--task", server.url, result, "abort")
    assert "error" not in out.lower(), out
    first.client.cmd("--project", server.url, "update")
    server.wait_for(
        "the reissued task assimilated", lambda: assimilated(server, "abort_0"), timeout=bound(900)
    )
    rows = results(server, "abort_0")
    aborted = [r for r in rows if r["name"] == result]
    assert aborted[0]["outcome"] == str(CLIENT_ERROR), aborted
    assert aborted[0]["exit_status"] == str(EXIT_ABORTED_VIA_GUI), aborted
    (ok,) = [r for r in rows if r["outcome"] == str(SUCCESS)]
    assert int(ok["hostid"] or 0) != first.hostid()
    assert upload(server, str(ok["name"])) == job.expected_out.encode()
    assert not qemu_pids_under(first.slots), "a VM outlived its aborted task"


@pytest.mark.parametrize(
    ("name", "script", "max_nbytes", "why"),
    [
        ("fails_0", "echo giving up >&2; exit 3\n", 100_000, "the guest program exited with code 3"),
        ("toobig_0", "head -c 4096 /dev/zero > out\n", 100, "output out:"),
    ],
)
def test_a_failing_job_ends_as_an_error_result_with_the_exit_status(
    admin: Admin, volunteers: dict[str, Volunteer], name: str, script: str, max_nbytes: int, why: str
) -> None:
    server = admin.server
    (admin.work / f"{name}.sh").write_text(script)
    job = VmJob(task=Task(application="/bin/sh"), output_files=(OutputFile("out", max_nbytes),))
    inputs = (InputSpec("job.sh", str(admin.work / f"{name}.sh")),)
    wu = admin.workunits(
        name, job, inputs, command_line="job.sh", resources=Resources(rsc_memory_bound=1e9), name=name
    )
    admin.deploy(str(wu))

    def errored() -> list[dict[str, str | None]]:
        for v in volunteers.values():
            v.client.cmd("--project", server.url, "update")
        return [r for r in results(server, name) if r["outcome"] == str(CLIENT_ERROR)]

    (first, *_) = server.wait_for("an error result", errored, timeout=bound(900), interval=5)
    assert first["exit_status"] == str(EXIT_CHILD_FAILED), first
    assert why in str(first["stderr_out"]), first["stderr_out"]
    assert first["validate_state"] != str(VALID)
