"""Debian's real ``boinc-client`` driven against a loopback project (:mod:`.loopback`).

Used by ``run-local --client boinc`` (an administrator's app version and workunit under the
real client on one machine) and by the tests. :class:`Client` runs the client in its own data
directory and GUI RPC port; :class:`ClientLauncher` runs it inside another root;
:func:`run_with_boinc_client` signs a copy of the app version with a throwaway key, serves
it and the workunit from a :class:`~boincvm.runlocal.loopback.LoopbackProject` and watches
the client until it reports the task.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol

from boincvm import proc
from boincvm.appversion.model import parse_version_xml
from boincvm.boinc.errors import ClientError
from boincvm.boinc.slot import escape_project_url
from boincvm.errors import CommandNotFound

# Re-exported for benchmarks/bench_bare_host.py until it imports it from .loopback.
from boincvm.runlocal.loopback import LoopbackProject
from boincvm.runlocal.request import CREDIT_PER_FLOP, LiveState, RunLocalRequest, RunSummary
from boincvm.signing import load_private_key, sign_file, write_key_pair
from boincvm.wrapper.status import StatusReport
from boincvm.xmlio import escape_text


@dataclass(frozen=True)
class ClientLauncher:
    """How ``boinc`` is started: the host's own by default, or inside another root file system.

    Attributes:
        prefix: the command that enters the client's environment (a chroot, a mount
            namespace) and then runs the rest of the argument list there.
        root: the directory that environment sees as ``/``. The client's data directory
            must lie below it; the client is given its path as seen from inside.
    """

    prefix: tuple[str, ...] = ()
    root: Path = Path("/")

    def inside(self, path: Path) -> Path:
        """``path`` (on this host) as the client sees it.

        Raises:
            ValueError: ``path`` is not below ``root``.
        """
        return Path("/") / path.resolve().relative_to(self.root.resolve())

    def argv(self, *args: str) -> list[str]:
        """The command line that runs ``boinc ARGS`` in this environment."""
        return [*self.prefix, "boinc", *args]


#: The host's own client.
HOST = ClientLauncher()


class AttachableProject(Protocol):
    """What a client needs of a project: its master URL (a :class:`LoopbackProject`, or a real
    BOINC server's project)."""

    @property
    def url(self) -> str: ...


if TYPE_CHECKING:  # a default for the type parameter (PEP 696): plain ``Client`` means the loopback one
    from typing_extensions import TypeVar

    P = TypeVar("P", bound=AttachableProject, default=LoopbackProject)
else:
    P = typing.TypeVar("P", bound=AttachableProject)


class Client(Generic[P]):
    """Debian's boinc client in its own data directory and GUI RPC port.

    ``launcher`` says where the client runs (default: on this host); ``boinccmd`` is always
    the host's, over the GUI RPC port, so the client's environment needs none of it. The client
    is attached to ``project`` with ``authenticator`` (the loopback project takes any).
    """

    def __init__(
        self,
        data_dir: Path,
        project: P,
        *,
        authenticator: str = "boincvm-test",
        checkpoint_period: float = 5.0,
        leave_apps_in_memory: bool = False,
        launcher: ClientLauncher = HOST,
    ) -> None:
        self.dir = data_dir
        self.project = project
        self.launcher = launcher
        launcher.inside(data_dir)  # fails early (ValueError) when the data lies outside its root
        data_dir.mkdir(parents=True, exist_ok=True)
        host_part = escape_project_url(project.url)
        (data_dir / f"account_{host_part}.xml").write_text(
            f"<account>\n<master_url>{project.url}</master_url>\n"
            f"<authenticator>{escape_text(authenticator)}</authenticator>\n</account>\n"
        )
        (data_dir / "cc_config.xml").write_text(
            "<cc_config>\n<log_flags>\n<task_debug>1</task_debug>\n<sched_op_debug>1</sched_op_debug>\n"
            "</log_flags>\n<options>\n<no_info_fetch>1</no_info_fetch>\n<dont_contact_ref_site>1</dont_contact_ref_site>\n"
            "<report_results_immediately>1</report_results_immediately>\n</options>\n</cc_config>\n"
        )
        (data_dir / "global_prefs_override.xml").write_text(
            "<global_preferences>\n<run_if_user_active>1</run_if_user_active>\n<run_on_batteries>1</run_on_batteries>\n"
            f"<suspend_cpu_usage>0</suspend_cpu_usage>\n<disk_interval>{checkpoint_period}</disk_interval>\n"
            f"<leave_apps_in_memory>{int(leave_apps_in_memory)}</leave_apps_in_memory>\n"
            "<max_ncpus_pct>100</max_ncpus_pct>\n<cpu_usage_limit>100</cpu_usage_limit>\n</global_preferences>\n"
        )
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, exit_when_idle: bool = True) -> None:
        """Start ``boinc`` (output in ``client.log``)."""
        args = [
            "--dir",
            str(self.launcher.inside(self.dir)),
            "--gui_rpc_port",
            str(self.port),
            "--skip_cpu_benchmarks",
            "--no_gpus",
            "--allow_remote_gui_rpc",
        ]
        if exit_when_idle:
            args.append("--exit_when_idle")
        self.proc = proc.spawn(self.launcher.argv(*args), log_file=self.dir / "client.log", new_session=True)

    def cmd(self, *args: str, timeout: float = 20) -> str:
        """Run ``boinccmd`` against this client (the GUI RPC password is kept out of logs)."""
        auth = self.dir / "gui_rpc_auth.cfg"
        password = auth.read_text().strip() if auth.exists() else ""
        done = proc.run(
            ["boinccmd", "--host", f"127.0.0.1:{self.port}", "--passwd", password, *args],
            timeout=timeout,
            check=False,
            secrets=[password],
        )
        return (done.stdout + done.stderr).decode("utf-8", "replace")

    def tasks(self) -> dict[str, str]:
        """The first task of ``boinccmd --get_tasks`` as a dict (empty if none)."""
        out: dict[str, str] = {}
        for line in self.cmd("--get_tasks").splitlines():
            key, sep, value = line.strip().partition(":")
            if sep and key and key not in out:
                out[key.strip()] = value.strip()
        return out

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for the client to exit by itself; None if it did not."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Quit the client (and its tasks), firmly if needed."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.cmd("--quit", timeout=10)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        """The client's output so far."""
        p = self.dir / "client.log"
        return p.read_text(errors="replace") if p.exists() else ""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def boinc_available() -> bool:
    """Whether the client binaries are installed (the test command installs boinc-client)."""
    return shutil.which("boinc") is not None and shutil.which("boinccmd") is not None


def _report_value(report: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}>([^<]*)</{tag}>", report)
    return m.group(1) if m else None


def run_with_boinc_client(
    req: RunLocalRequest, on_update: Callable[[LiveState], None] | None = None
) -> RunSummary:
    """Run a workunit under Debian's real ``boinc`` client against a loopback project.

    The app version is signed with a throwaway key (in a copy; the original is untouched).

    Raises:
        CommandNotFound: boinc or boinccmd is not installed.
        InputError: the workunit or app version cannot be used.
        ClientError: the client did not finish within the request's timeout.
    """
    for tool in ("boinc", "boinccmd"):
        if shutil.which(tool) is None:
            raise CommandNotFound(
                f"{tool} was not found", hint="install boinc-client (apt-get install boinc-client)"
            )
    work = req.data_dir / "real-client"
    if work.exists():
        shutil.rmtree(work)
    av, public = _signed_copy(req.app_version_dir, work)
    project = LoopbackProject(av, req.workunit_dir, public).start()
    client = Client(work / "client", project, checkpoint_period=req.checkpoint_period)
    live = LiveState()
    t0 = time.monotonic()
    try:
        client.start()
        _watch(client, project, live, req.timeout, on_update)
        client.wait_exit(30)
    finally:
        client.stop()
        project.stop()
    return _summary(req, project, live, time.monotonic() - t0)


def _signed_copy(app_version_dir: Path, work: Path) -> tuple[Path, Path]:
    """A copy of the app version in ``work`` signed with a throwaway key; the copy and the public key."""
    private, public = write_key_pair(work / "keys")
    key = load_private_key(private)
    av = work / "app-version"
    shutil.copytree(app_version_dir, av)
    for f in parse_version_xml((av / "version.xml").read_bytes())[0].files:
        (av / f"{f.physical_name}.sig").write_text(sign_file(av / f.physical_name, key), encoding="ascii")
    return av, public


def _watch(
    client: Client,
    project: LoopbackProject,
    live: LiveState,
    timeout: float,
    on_update: Callable[[LiveState], None] | None,
) -> None:
    """Follow the task through ``boinccmd`` and the slot until the client reports it.

    Raises:
        ClientError: no report within ``timeout`` seconds.
    """
    t0 = time.monotonic()
    while not project.seen.reports:
        if time.monotonic() > t0 + timeout:
            raise ClientError(
                f"the BOINC client did not report the task within {timeout:g} s",
                hint=f"see {client.dir / 'client.log'}",
            )
        _observe(client, project, live)
        live.elapsed = time.monotonic() - t0
        if on_update is not None:
            on_update(live)
        time.sleep(1.0)


def _observe(client: Client, project: LoopbackProject, live: LiveState) -> None:
    """One look at the client's task (its state, fraction done and CPU time) and the slot."""
    task = client.tasks()
    if task:
        live.phase = task.get("active_task_state", task.get("state", live.phase)).lower()
        try:
            live.fraction_done = float(task.get("fraction done", live.fraction_done))
            live.cpu_time = float(task.get("current CPU time", live.cpu_time))
        except ValueError:
            pass
    elif project.seen.uploads:
        live.phase = "uploaded"
    # The wrapper's typed status in the client's slot counts the committed checkpoints
    # (cumulative across restarts); the slot is gone once the task has finished.
    for slot in sorted((client.dir / "slots").glob("*")):
        status = StatusReport.read(slot)
        if status is not None:
            live.checkpoints = max(live.checkpoints, status.checkpoints)
            live.last_output = status.last_output or live.last_output


def _save_outputs(project: LoopbackProject, results_dir: Path) -> list[dict[str, object]]:
    """The uploaded outputs, written to ``results_dir``; a required one not uploaded is an error."""
    results_dir.mkdir(parents=True, exist_ok=True)
    outputs: list[dict[str, object]] = []
    for phys, open_name, _ in project.outputs:
        data = project.seen.uploads.get(phys)
        entry: dict[str, object] = {
            "name": open_name,
            "file": phys,
            "size": None if data is None else len(data),
        }
        if data is not None:
            (results_dir / open_name).write_bytes(data)
            entry["path"] = str(results_dir / open_name)
        elif open_name not in project.optional:
            entry["error"] = f"output {open_name} was not uploaded"
        outputs.append(entry)
    return outputs


def _summary(req: RunLocalRequest, project: LoopbackProject, live: LiveState, elapsed: float) -> RunSummary:
    """The summary of the task as the client reported it (its last report)."""
    report = project.seen.reports[-1]
    exit_status = int(_report_value(report, "exit_status") or -1)
    cpu = float(_report_value(report, "final_cpu_time") or 0.0)
    found = re.search(r"<stderr_txt>(.*)</stderr_txt>", report, re.S)
    stderr = found.group(1) if found else ""
    outputs = _save_outputs(project, req.results_dir)
    (req.results_dir / "stderr.txt").write_text(stderr, encoding="utf-8")
    ok = exit_status == 0 and not any(o.get("error") for o in outputs)
    return RunSummary(
        workunit=project.record_.name,
        outcome="success" if exit_status == 0 else "compute_error",
        ok=ok,
        exit_code=exit_status,
        message=f"reported by the BOINC client with exit status {exit_status}",
        elapsed=elapsed,
        cpu_time=cpu,
        credit_claimed=cpu * 1e9 * CREDIT_PER_FLOP,
        ops=None,
        checkpoints=live.checkpoints,
        starts=max(1, stderr.count("boincvm: starting") + stderr.count("resuming from checkpoint")),
        timings={},
        outputs=outputs,
        results_dir=str(req.results_dir),
        events=[],
        stderr_tail=stderr[-4000:],
    )
