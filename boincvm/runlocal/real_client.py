"""A minimal BOINC project on 127.0.0.1 and Debian's real ``boinc-client`` driven against it.

Used by ``run-local --client boinc`` (an administrator's app version and workunit under the
real client on one machine) and by the tests.

The project serves exactly what boincvm made: the signed app version from
``package-image --sign-key`` and one workunit from ``make-workunit``. It answers the
master page, the scheduler (one job, acks for reports, empty replies otherwise), downloads
(with Range; ``<gzip/>`` app files also as ``NAME.gz``, as update_versions stages them)
and the upload handler (with the size query), and records what the client fetched,
reported and uploaded. Facts it relies on (from running the 7.20.5 client): the master URL
needs a dotted host and a trailing slash, app files must be signed (``--unsigned_apps_ok``
switches the network off), an upload URL must contain ``file_upload_handler``, and every
report must be acknowledged. Debian 11's 7.16.16 client takes the same project (signed
files, ``NAME.gz`` downloads); :class:`ClientLauncher` runs a client inside another root.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol

from boincvm import proc
from boincvm.appversion.model import parse_version_xml
from boincvm.boinc.errors import ClientError
from boincvm.boinc.slot import escape_project_url
from boincvm.errors import CommandNotFound
from boincvm.runlocal.request import CREDIT_PER_FLOP, LiveState, RunLocalRequest, RunSummary
from boincvm.signing import load_private_key, sign_file, write_key_pair
from boincvm.workunit.directory import open_workunit_dir
from boincvm.workunit.templates import read_output_template, resources_of
from boincvm.wrapper.status import StatusReport
from boincvm.xmlio import escape_text

log = logging.getLogger(__name__)


@dataclass
class Record:
    """What the project saw."""

    requests: list[str] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)
    size_queries: list[str] = field(default_factory=list)
    uploads: dict[str, bytes] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)
    upload_times: dict[str, float] = field(default_factory=dict)
    #: Trickle-up messages the client sent (``<msg_from_host>``): result, variety, text.
    trickles: list[dict[str, str]] = field(default_factory=list)


class LoopbackProject:
    """The project front. ``start()`` it, point a client at ``master_url``, ``stop()`` it."""

    def __init__(
        self, app_version: Path, workunit_dir: Path, public_key: Path, *, short_name: str = "boincvm"
    ) -> None:
        self.av = app_version
        self.wud = open_workunit_dir(workunit_dir)
        self.record_ = self.wud.record()
        self.public_key = public_key.read_text(encoding="ascii")
        self.short = short_name
        self.app = self.wud.app_name
        self.seen = Record()
        self.job_sent = False
        self.result_name = f"{self.record_.name}_0"
        vx, _ = parse_version_xml((app_version / "version.xml").read_bytes())
        self.app_files = vx.files
        # What update_versions would take from version.xml, so the client judges our file:
        # without <api_version> it would fall back to SysV shared memory.
        self.app_version_flags = (
            (f"    <api_version>{escape_text(vx.api_version)}</api_version>\n" if vx.api_version else "")
            + ("    <is_wrapper/>\n" if vx.is_wrapper else "")
            + "    <dont_throttle/>\n"
        )
        # As update_versions stages them: a <gzip/> file is also offered as NAME.gz, and
        # the client then downloads only that and gunzips it before checking the signature.
        self.gzipped = {
            f"{f.physical_name}.gz": gzip.compress((app_version / f.physical_name).read_bytes(), 1, mtime=0)
            for f in self.app_files
            if f.gzip
        }
        _, result_files = read_output_template(self.wud.output_template.read_bytes(), "out")
        self.outputs = [
            (f"{self.result_name}_{i}", f.open_name, int(f.max_nbytes or 0))
            for i, f in enumerate(result_files)
        ]
        self.optional = {f.open_name for f in result_files if f.optional}

        # The bounds our input template gives create_work (its defaults where it gives none),
        # so the client's time, memory and disk limits are the ones a real project would set.
        res = resources_of(self.wud.input_template.read_bytes())
        self.bounds = {
            tag: float(getattr(res, tag))
            for tag in ("rsc_fpops_est", "rsc_fpops_bound", "rsc_memory_bound", "rsc_disk_bound")
        }

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the project."""
        return f"http://127.0.0.1:{self.port}/{self.short}/"

    master_url = url

    def start(self) -> LoopbackProject:
        """Serve in a background thread."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

    # -- what the client gets -----------------------------------------------------
    def master_page(self) -> bytes:
        sched = f"{self.url}cgi/scheduler"
        return (
            f'<html><head>\n<link rel="boinc_scheduler" href="{sched}">\n</head><body>\n'
            f"<scheduler>{sched}</scheduler>\n</body></html>\n"
        ).encode()

    def _download(self, name: str) -> bytes | None:
        if name in self.gzipped:
            return self.gzipped[name]
        for base in (self.av, self.wud.download):
            p = base / name
            if p.is_file() and p.parent == base:
                return p.read_bytes()
        return None

    def scheduler_reply(self, request: str) -> str:
        out = ["<scheduler_reply>"]
        # Trickle-up messages: the client keeps its trickle_up_*.xml files until a reply
        # carries <message_ack/>, then deletes them (a project's scheduler acknowledges so).
        messages = re.findall(r"<msg_from_host>(.*?)</msg_from_host>", request, re.DOTALL)
        for msg in messages:
            result = re.search(r"<result_name>([^<]*)</result_name>", msg)
            variety = re.search(r"<variety>([^<]*)</variety>", msg)
            text = re.sub(r"<(result_name|time|variety)>[^<]*</\1>\n?", "", msg).strip()
            trickle = {
                "result": result.group(1) if result else "",
                "variety": variety.group(1) if variety else "",
                "text": text,
            }
            self.seen.trickles.append(trickle)
            log.info("trickle up from %s (variety %s): %s", trickle["result"], trickle["variety"], text[:200])
        if messages:
            out.append("<message_ack/>")
        for name in re.findall(r"<result>\s*<name>([^<]+)</name>", request):
            self.seen.reports.append(request)
            out.append(f"<result_ack>\n    <name>{escape_text(name)}</name>\n</result_ack>")
        wants_work = re.search(r"<work_req_seconds>([0-9.e+]+)</work_req_seconds>", request)
        wanted = wants_work is not None and float(wants_work.group(1)) > 0
        wanted = wanted or re.search(r"<cpu_req_secs>([0-9.e+]+)</cpu_req_secs>", request) is not None
        if not self.job_sent and wanted:
            self.job_sent = True
            out.append(self._job_xml())
        out.append("</scheduler_reply>\n")
        return "\n".join(out)

    def _job_xml(self) -> str:
        parts = [
            f"<code_sign_key>\n{self.public_key}</code_sign_key>",
            f"<app>\n    <name>{self.app}</name>\n</app>",
        ]
        refs = []
        for f in self.app_files:
            sig = (self.av / f"{f.physical_name}.sig").read_text(encoding="ascii")
            parts.append(
                "<file_info>\n"
                f"    <name>{f.physical_name}</name>\n"
                f"    <url>{self.url}download/{f.physical_name}</url>\n"
                + (
                    f"    <gzipped_url>{self.url}download/{f.physical_name}.gz</gzipped_url>\n"
                    f"    <gzipped_nbytes>{len(self.gzipped[f.physical_name + '.gz'])}</gzipped_nbytes>\n"
                    if f.gzip
                    else ""
                )
                + ("    <executable/>\n" if f.main_program else "")
                + f"    <file_signature>\n{sig}</file_signature>\n"
                f"    <nbytes>{(self.av / f.physical_name).stat().st_size}</nbytes>\n"
                "</file_info>"
            )
            refs.append(
                "    <file_ref>\n"
                f"        <file_name>{f.physical_name}</file_name>\n"
                + (f"        <open_name>{f.logical_name}</open_name>\n" if f.logical_name else "")
                + ("        <main_program/>\n" if f.main_program else "")
                + "    </file_ref>"
            )
        parts.append(
            "<app_version>\n"
            f"    <app_name>{self.app}</app_name>\n    <version_num>100</version_num>\n"
            + self.app_version_flags
            + "\n".join(refs)
            + "\n</app_version>"
        )
        wu_refs = []
        for wf in self.record_.files:
            parts.append(
                "<file_info>\n"
                f"    <name>{wf.physical_name}</name>\n"
                f"    <url>{self.url}download/{wf.physical_name}</url>\n"
                f"    <md5_cksum>{wf.md5}</md5_cksum>\n    <nbytes>{wf.nbytes}</nbytes>\n"
                "</file_info>"
            )
            wu_refs.append(
                f"    <file_ref>\n        <file_name>{wf.physical_name}</file_name>\n"
                f"        <open_name>{escape_text(wf.open_name)}</open_name>\n    </file_ref>"
            )
        parts.append(
            "<workunit>\n"
            f"    <name>{self.record_.name}</name>\n    <app_name>{self.app}</app_name>\n"
            f"    <version_num>100</version_num>\n"
            f"    <command_line>{escape_text(self.record_.command_line)}</command_line>\n"
            + "".join(f"    <{tag}>{value:.15g}</{tag}>\n" for tag, value in self.bounds.items())
            + "\n".join(wu_refs)
            + "\n</workunit>"
        )
        res_refs = []
        for phys, open_name, max_nbytes in self.outputs:
            parts.append(
                "<file_info>\n"
                f"    <name>{phys}</name>\n    <max_nbytes>{max_nbytes}</max_nbytes>\n"
                f"    <url>{self.url}cgi/file_upload_handler</url>\n"
                "</file_info>"
            )
            res_refs.append(
                f"    <file_ref>\n        <file_name>{phys}</file_name>\n"
                f"        <open_name>{escape_text(open_name)}</open_name>\n"
                + ("        <optional/>\n" if open_name in self.optional else "")
                + "    </file_ref>"
            )
        parts.append(
            "<result>\n"
            f"    <name>{self.result_name}</name>\n    <wu_name>{self.record_.name}</wu_name>\n"
            f"    <report_deadline>{int(time.time()) + 86400}</report_deadline>\n"
            f"    <version_num>100</version_num>\n" + "\n".join(res_refs) + "\n</result>"
        )
        return "\n".join(parts)

    def upload(self, body: bytes) -> str:
        head, sep, data = body.partition(b"<data>\n")
        text = head.decode("utf-8", "replace")
        m = re.search(r"<get_file_size>([^<]+)</get_file_size>", text)
        if m:
            self.seen.size_queries.append(m.group(1))
            size = len(self.seen.uploads.get(m.group(1), b""))
            return (
                f"<data_server_reply>\n    <status>0</status>\n    <file_size>{size}</file_size>\n"
                "</data_server_reply>\n"
            )
        name = re.search(r"<name>([^<]+)</name>", text)
        nbytes = re.search(r"<nbytes>([0-9]+)</nbytes>", text)
        offset = re.search(r"<offset>([0-9]+)</offset>", text)
        if not (sep and name and nbytes):
            return "<data_server_reply>\n    <status>-1</status>\n</data_server_reply>\n"
        start = int(offset.group(1)) if offset else 0
        previous = self.seen.uploads.get(name.group(1), b"")[:start]
        self.seen.uploads[name.group(1)] = previous + data[: int(nbytes.group(1)) - start]
        self.seen.upload_times[name.group(1)] = time.monotonic()
        return "<data_server_reply>\n    <status>0</status>\n</data_server_reply>\n"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        project = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
                pass

            def _send(
                self, code: int, body: bytes, ctype: str = "text/plain", extra: dict[str, str] | None = None
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                prefix = f"/{project.short}/"
                if path in (prefix, prefix.rstrip("/")):
                    self._send(200, project.master_page(), "text/html")
                    return
                if path.startswith(prefix + "download/"):
                    name = path[len(prefix + "download/") :]
                    data = project._download(name)
                    if data is None:
                        self._send(404, b"not found")
                        return
                    project.seen.downloads.append(name)
                    rng = self.headers.get("Range")
                    m = re.match(r"bytes=(\d+)-", rng or "")
                    if m:
                        start = int(m.group(1))
                        if start >= len(data):
                            self._send(416, b"")
                            return
                        self._send(
                            206,
                            data[start:],
                            "application/octet-stream",
                            {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
                        )
                        return
                    self._send(200, data, "application/octet-stream")
                    return
                self._send(404, b"not found")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path.endswith("/cgi/scheduler"):
                    request = body.decode("utf-8", "replace")
                    project.seen.requests.append(request)
                    self._send(200, project.scheduler_reply(request).encode(), "text/xml")
                elif "file_upload_handler" in self.path:
                    self._send(200, project.upload(body).encode())
                else:
                    self._send(404, b"not found")

        return Handler


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
    keys = work / "keys"
    private, public = write_key_pair(keys)
    key = load_private_key(private)
    av = work / "app-version"
    shutil.copytree(req.app_version_dir, av)
    for f in parse_version_xml((av / "version.xml").read_bytes())[0].files:
        (av / f"{f.physical_name}.sig").write_text(sign_file(av / f.physical_name, key), encoding="ascii")
    project = LoopbackProject(av, req.workunit_dir, public).start()
    client = Client(work / "client", project, checkpoint_period=req.checkpoint_period)
    live = LiveState()
    t0 = time.monotonic()
    try:
        client.start()
        deadline = t0 + req.timeout
        while not project.seen.reports:
            if time.monotonic() > deadline:
                raise ClientError(
                    f"the BOINC client did not report the task within {req.timeout:g} s",
                    hint=f"see {work / 'client' / 'client.log'}",
                )
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
            live.elapsed = time.monotonic() - t0
            if on_update is not None:
                on_update(live)
            time.sleep(1.0)
        client.wait_exit(30)
    finally:
        client.stop()
        project.stop()
    report = project.seen.reports[-1]
    exit_status = int(_report_value(report, "exit_status") or -1)
    cpu = float(_report_value(report, "final_cpu_time") or 0.0)
    found = re.search(r"<stderr_txt>(.*)</stderr_txt>", report, re.S)
    stderr = found.group(1) if found else ""
    req.results_dir.mkdir(parents=True, exist_ok=True)
    outputs: list[dict[str, object]] = []
    for phys, open_name, _ in project.outputs:
        data = project.seen.uploads.get(phys)
        entry: dict[str, object] = {
            "name": open_name,
            "file": phys,
            "size": None if data is None else len(data),
        }
        if data is not None:
            (req.results_dir / open_name).write_bytes(data)
            entry["path"] = str(req.results_dir / open_name)
        elif open_name not in project.optional:
            entry["error"] = f"output {open_name} was not uploaded"
        outputs.append(entry)
    (req.results_dir / "stderr.txt").write_text(stderr, encoding="utf-8")
    ok = exit_status == 0 and not any(o.get("error") for o in outputs)
    return RunSummary(
        workunit=project.record_.name,
        outcome="success" if exit_status == 0 else "compute_error",
        ok=ok,
        exit_code=exit_status,
        message=f"reported by the BOINC client with exit status {exit_status}",
        elapsed=time.monotonic() - t0,
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
