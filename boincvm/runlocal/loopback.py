"""A minimal BOINC project on 127.0.0.1 that serves exactly what boincvm made.

The project serves the signed app version from ``package-image --sign-key`` and one workunit
from ``make-workunit``. It answers the master page, the scheduler (one job, acks for reports,
empty replies otherwise), downloads (with Range; ``<gzip/>`` app files also as ``NAME.gz``,
as update_versions stages them) and the upload handler (with the size query), and records
what the client fetched, reported and uploaded. Facts it relies on (from running the 7.20.5
client): the master URL needs a dotted host and a trailing slash, app files must be signed
(``--unsigned_apps_ok`` switches the network off), an upload URL must contain
``file_upload_handler``, and every report must be acknowledged. Debian 11's 7.16.16 client
takes the same project (signed files, ``NAME.gz`` downloads). The client that talks to it is
:class:`~boincvm.runlocal.real_client.Client`.
"""

from __future__ import annotations

import gzip
import logging
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from boincvm.appversion.model import parse_version_xml
from boincvm.workunit.directory import open_workunit_dir
from boincvm.workunit.templates import read_output_template, resources_of
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

        self.server = _ProjectServer(self)
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

    def served_file(self, name: str) -> bytes | None:
        """The bytes served at ``download/NAME`` (an app version or workunit file), or None."""
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
        """The scheduler reply's one job: the key, the app, its version, the workunit, the result."""
        parts = [
            f"<code_sign_key>\n{self.public_key}</code_sign_key>",
            f"<app>\n    <name>{self.app}</name>\n</app>",
        ]
        parts += self._app_version_xml()
        parts += self._workunit_xml()
        parts += self._result_xml()
        return "\n".join(parts)

    def _executable(self, physical_name: str) -> bool:
        """update_versions marks a file ``<executable/>`` from its owner's execute bit; so does this."""
        return bool((self.av / physical_name).stat().st_mode & stat.S_IXUSR)

    def _app_version_xml(self) -> list[str]:
        """The app files' ``<file_info>``s (signed, gzipped where asked) and the ``<app_version>``."""
        parts, refs = [], []
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
                + ("    <executable/>\n" if f.main_program or self._executable(f.physical_name) else "")
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
        return parts

    def _workunit_xml(self) -> list[str]:
        """The workunit's input ``<file_info>``s and the ``<workunit>`` with its bounds."""
        parts, refs = [], []
        for wf in self.record_.files:
            parts.append(
                "<file_info>\n"
                f"    <name>{wf.physical_name}</name>\n"
                f"    <url>{self.url}download/{wf.physical_name}</url>\n"
                f"    <md5_cksum>{wf.md5}</md5_cksum>\n    <nbytes>{wf.nbytes}</nbytes>\n"
                "</file_info>"
            )
            refs.append(
                f"    <file_ref>\n        <file_name>{wf.physical_name}</file_name>\n"
                f"        <open_name>{escape_text(wf.open_name)}</open_name>\n    </file_ref>"
            )
        parts.append(
            "<workunit>\n"
            f"    <name>{self.record_.name}</name>\n    <app_name>{self.app}</app_name>\n"
            f"    <version_num>100</version_num>\n"
            f"    <command_line>{escape_text(self.record_.command_line)}</command_line>\n"
            + "".join(f"    <{tag}>{value:.15g}</{tag}>\n" for tag, value in self.bounds.items())
            + "\n".join(refs)
            + "\n</workunit>"
        )
        return parts

    def _result_xml(self) -> list[str]:
        """The outputs' ``<file_info>``s (uploaded to our handler) and the ``<result>``."""
        parts, refs = [], []
        for phys, open_name, max_nbytes in self.outputs:
            parts.append(
                "<file_info>\n"
                f"    <name>{phys}</name>\n    <max_nbytes>{max_nbytes}</max_nbytes>\n"
                f"    <url>{self.url}cgi/file_upload_handler</url>\n"
                "</file_info>"
            )
            refs.append(
                f"    <file_ref>\n        <file_name>{phys}</file_name>\n"
                f"        <open_name>{escape_text(open_name)}</open_name>\n"
                + ("        <optional/>\n" if open_name in self.optional else "")
                + "    </file_ref>"
            )
        parts.append(
            "<result>\n"
            f"    <name>{self.result_name}</name>\n    <wu_name>{self.record_.name}</wu_name>\n"
            f"    <report_deadline>{int(time.time()) + 86400}</report_deadline>\n"
            f"    <version_num>100</version_num>\n" + "\n".join(refs) + "\n</result>"
        )
        return parts

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


class _ProjectServer(ThreadingHTTPServer):
    """The HTTP server of one :class:`LoopbackProject` (its handlers reach it as ``server.project``)."""

    def __init__(self, project: LoopbackProject) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.project = project


class _Handler(BaseHTTPRequestHandler):
    """The project's pages: the master page, downloads, the scheduler and the upload handler."""

    server: _ProjectServer

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
        project = self.server.project
        path = self.path.split("?")[0]
        prefix = f"/{project.short}/"
        if path in (prefix, prefix.rstrip("/")):
            self._send(200, project.master_page(), "text/html")
        elif path.startswith(prefix + "download/"):
            self._download(path[len(prefix + "download/") :])
        else:
            self._send(404, b"not found")

    def _download(self, name: str) -> None:
        """A file of the app version or workunit, whole or from a ``Range: bytes=N-``."""
        project = self.server.project
        data = project.served_file(name)
        if data is None:
            self._send(404, b"not found")
            return
        project.seen.downloads.append(name)
        m = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if not m:
            self._send(200, data, "application/octet-stream")
            return
        start = int(m.group(1))
        if start >= len(data):
            self._send(416, b"")
            return
        content_range = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        self._send(206, data[start:], "application/octet-stream", content_range)

    def do_POST(self) -> None:
        project = self.server.project
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
