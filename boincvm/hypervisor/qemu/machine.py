"""One QEMU process and its two channels: QMP for the machine, qemu-guest-agent for the guest.

:class:`QemuMachine` starts QEMU (:meth:`~QemuMachine._spawn`), speaks QMP to it, waits for
the agent, pauses and continues it, accounts its CPU time and stops it, softly then
firmly. The layers above it add checkpoints (:mod:`.snapshots`), the start paths
(:mod:`.launch`) and the guest programs and files (:mod:`.backend`).

QEMU cannot outlive its owner: it is started with a parent-death signal (SIGKILL) from a
thread that lives as long as the process, an ``atexit`` hook kills what is left, and
the pidfile is reaped when the slot starts again.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from boincvm import proc
from boincvm.errors import GuestError, HypervisorError, VmTimeout
from boincvm.hypervisor.base import Backend, ProcessStatus, VmSpec, polls
from boincvm.hypervisor.qemu import cmdline as cl
from boincvm.hypervisor.qemu import runtime as qemu_rt
from boincvm.hypervisor.qemu.accel import AccelChoice
from boincvm.hypervisor.qemu.aio import shared_loop
from boincvm.hypervisor.qemu.options import QemuOptions
from boincvm.hypervisor.qemu.qga import GuestAgent, connect_unix

log = logging.getLogger(__name__)

#: The copy-on-write overlay on the read-only base (it holds the snapshots too).
OVERLAY = "disk.qcow2"
QEMU_LOG = "qemu.log"
CLK_TCK = os.sysconf("SC_CLK_TCK")
QMP_CLIENT_NAME = "boincvm-qmp"
# qemu.qmp logs a QEMU that quits (end-of-file) at INFO: for us that is the normal end.
logging.getLogger(f"qemu.qmp.protocol.{QMP_CLIENT_NAME}").setLevel(logging.WARNING)

_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    # A safety net for owners that exit without power_off; SIGKILL of the owner is
    # covered by the parent-death signal instead.
    with _live_lock:
        for p in list(_live):
            with contextlib.suppress(OSError):
                p.kill()


def _proc_cpu_seconds(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # fields[11..14] are utime, stime, cutime, cstime (stat fields 14-17)
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_bytes()[-8192:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _is_our_qemu(pid: int, workdir: Path) -> bool:
    """Whether process ``pid`` is a QEMU running in ``workdir``."""
    try:
        same_dir = Path(f"/proc/{pid}/cwd").resolve() == workdir.resolve()
        is_qemu = (
            "qemu" in Path(f"/proc/{pid}/comm").read_text()
            or b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes()
        )
    except OSError:
        return False
    return same_dir and is_qemu


class QemuMachine(Backend):
    """The process layer of :class:`~boincvm.hypervisor.qemu.backend.QemuBackend`.

    Raises (any method): see :class:`~boincvm.hypervisor.base.Backend`.
    """

    call_timeout: ClassVar[float] = 60.0

    def __init__(self, spec: VmSpec) -> None:
        super().__init__(spec)
        self.workdir = spec.workdir
        self.opts = QemuOptions.from_options(spec.options)
        #: The QEMU this VM runs: the job's bundled runtime, or PATH's.
        self.tools = qemu_rt.tools_for(self.opts.runtime, spec.resolve_file)
        self.machine = self.opts.machine
        # q35 VMs started by this version carry a root port for transfer disks.
        self.hotplug_port = self.machine == "q35"
        self.accel: AccelChoice | None = None
        #: Seconds from the start of the last power_on (or revert) until QEMU answered QMP ("qemu"), the
        #: guest agent first answered ("agent") and the guest was ready to use, its clock
        #: set after a restore ("ready"); wait_for_tools fills the last two after a cold boot.
        self.start_timings: dict[str, float] = {}
        self._start_t0 = 0.0
        self._loop = shared_loop()
        self._popen: subprocess.Popen[bytes] | None = None
        self._qmp_client: QMPClient | None = None
        self._agent: GuestAgent | None = None
        self._finished: dict[int, ProcessStatus] = {}
        self._cpu_before = 0.0  # host CPU of this object's earlier QEMU processes

    def _path(self, name: str) -> Path:
        return self.workdir / name

    def _check_alive(self) -> None:
        if self._popen is None:
            raise HypervisorError(f"qemu: VM {self.spec.name} is not running")
        code = self._popen.poll()
        if code is not None:
            detail = _tail(self._path(QEMU_LOG)) or _tail(self._path(cl.CONSOLE_LOG))
            raise HypervisorError(
                f"qemu: VM {self.spec.name} exited with code {code}" + (f": {detail}" if detail else ""),
                hint=f"see {self._path(QEMU_LOG)} and {self._path(cl.CONSOLE_LOG)}",
            )

    async def _qmp_connect(self) -> QMPClient:
        client = QMPClient(QMP_CLIENT_NAME)
        await client.connect(connect_unix(self._path(cl.QMP_SOCKET)))
        return client

    def qmp(self, cmd: str, args: Mapping[str, object] | None = None, *, timeout: float | None = None) -> Any:
        """Run a QMP command and return its ``return`` value.

        Raises:
            HypervisorError: QEMU refused it or the connection broke.
            VmTimeout: no answer in time.
        """
        self._check_alive()
        client = self._qmp_client
        if client is None:
            raise HypervisorError(f"qemu: no QMP connection to {self.spec.name}")
        try:
            return self._loop.run(client.execute(cmd, dict(args) if args else None),
                                  timeout or self.call_timeout, f"QMP {cmd}")  # fmt: skip
        except ExecuteError as exc:
            raise HypervisorError(f"qemu: {cmd}: {exc}") from exc
        except QMPError as exc:
            self._check_alive()
            raise HypervisorError(f"qemu: {cmd}: the QMP connection broke: {exc}") from exc

    def send_fd(self, name: str, path: Path) -> None:
        """Open ``path`` for writing and hand the descriptor to QEMU as ``name`` (QMP ``getfd``).

        Raises:
            HypervisorError: QEMU refused it or the connection broke.
        """
        self._check_alive()
        client = self._qmp_client
        if client is None:
            raise HypervisorError(f"qemu: no QMP connection to {self.spec.name}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            try:
                client.send_fd_scm(fd)
            except (QMPError, OSError) as exc:
                raise HypervisorError(f"qemu: passing {path.name} to QEMU failed: {exc}") from exc
            self.qmp("getfd", {"fdname": name})
        finally:
            os.close(fd)  # QEMU holds its own copy now

    def _agent_or_fail(self) -> GuestAgent:
        self._check_alive()
        if self._agent is None:
            raise HypervisorError(f"qemu: VM {self.spec.name} is not running")
        return self._agent

    def _reap_stale(self) -> None:
        """Kill a QEMU a dead earlier owner left running in this work directory."""
        pidfile = self._path(cl.PIDFILE)
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if _is_our_qemu(pid, self.workdir):
            log.info("killing leftover QEMU %d of %s", pid, self.spec.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in polls(10, 0.02):
                if not Path(f"/proc/{pid}").exists():
                    break
        pidfile.unlink(missing_ok=True)

    # -- start ----------------------------------------------------------------
    def _spawn(self, args: cl.QemuArgs, pass_fds: Sequence[int] = ()) -> None:
        # The bundled QEMU (through its loader, with its firmware) when the job named one.
        argv: list[str] = [*self.tools.system_command(), *cl.build_argv(args)[1:]]
        for sock in (cl.QMP_SOCKET, cl.QGA_SOCKET):
            self._path(sock).unlink(missing_ok=True)
        # Forked from the long-lived I/O thread: the parent-death signal follows the
        # thread that forked, and a caller's short-lived thread would take QEMU with it.
        popen = self._loop.call(
            lambda: proc.spawn(
                argv,
                log_file=self._path(QEMU_LOG),
                cwd=self.workdir,
                pass_fds=pass_fds,
                env=self.tools.env,
                die_with_parent=True,
            )
        )
        with _live_lock:
            _live.add(popen)
        self._popen = popen
        self._qmp_client = self._connect_qmp()
        self._agent = GuestAgent(self._path(cl.QGA_SOCKET), self._loop, call_timeout=self.call_timeout)
        self.start_timings["qemu"] = time.monotonic() - self._start_t0

    def _connect_qmp(self) -> QMPClient:
        """Connect to the QEMU just started, retrying until its socket is there (30 s at most)."""
        problem: Exception | None = None
        for _ in polls(30, 0.02):
            self._check_alive()
            try:
                return self._loop.run(self._qmp_connect(), 5.0, "connecting to QMP")
            except (QMPError, OSError) as exc:
                problem = exc
        self.power_off(soft_timeout=0)
        raise HypervisorError(f"qemu: QMP did not come up within 30 s: {problem}") from problem

    def _ensure_running(self) -> None:
        if not self.qmp("query-status").get("running"):
            self.qmp("cont")

    def _after_restore(self) -> None:
        agent = self._agent_or_fail()
        agent.resync(min(self.spec.boot_timeout, 60.0))
        self.start_timings["agent"] = time.monotonic() - self._start_t0
        agent.set_time()
        self.start_timings["ready"] = time.monotonic() - self._start_t0

    def wait_for_tools(self, timeout: float | None = None) -> None:
        """Block until qemu-ga answers ``guest-sync`` (bounded).

        Raises:
            GuestToolsMissing: no answer within the timeout.
            HypervisorError: QEMU exited meanwhile.
        """
        self._agent_or_fail().wait(self.spec.boot_timeout if timeout is None else timeout, self._check_alive)
        if "agent" not in self.start_timings:  # the first answer after a cold boot
            self.start_timings["agent"] = self.start_timings["ready"] = time.monotonic() - self._start_t0

    # -- stop -----------------------------------------------------------------
    def power_off(self, *, soft_timeout: float = 10.0) -> None:
        """Quit QEMU through QMP, then SIGKILL it if it has not gone within ``soft_timeout``. Idempotent.

        The guest is not asked to shut down: its disk is the throw-away overlay, and QEMU
        flushes the overlay itself when it quits.
        """
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._popen is not None:
            self._stop_process(self._popen, soft_timeout)
            self._popen = None
        if self._qmp_client is not None:
            client, self._qmp_client = self._qmp_client, None
            with contextlib.suppress(VmTimeout, QMPError, OSError, EOFError):
                self._loop.run(client.disconnect(), 5.0, "closing QMP")
        for name in (cl.QMP_SOCKET, cl.QGA_SOCKET, cl.PIDFILE):
            self._path(name).unlink(missing_ok=True)

    def _stop_process(self, popen: subprocess.Popen[bytes], soft_timeout: float) -> None:
        cpu = _proc_cpu_seconds(popen.pid)
        if popen.poll() is None and soft_timeout > 0 and self._qmp_client is not None:
            with contextlib.suppress(HypervisorError, VmTimeout):
                self.qmp("quit", timeout=min(soft_timeout, 5.0))
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(soft_timeout)
        if popen.poll() is None:
            popen.kill()
            popen.wait(30)
        self._cpu_before += cpu or 0.0
        with _live_lock:
            _live.discard(popen)

    def is_running(self) -> bool:
        """True while this object's QEMU process exists."""
        return self._popen is not None and self._popen.poll() is None

    def pause(self) -> None:
        """Stop the guest CPUs (QMP ``stop``)."""
        self.qmp("stop")

    def resume(self) -> None:
        """Continue the guest (QMP ``cont``) and, best effort, set its clock to now."""
        self.qmp("cont")
        agent = self._agent_or_fail()
        try:
            agent.set_time()
        except (GuestError, VmTimeout) as exc:  # e.g. paused before the agent started
            log.debug("guest-set-time after resume: %s", exc)

    # -- accounting -----------------------------------------------------------
    def host_cpu_time(self) -> float:
        """CPU seconds of this object's QEMU processes (user + system, with reaped children)."""
        now = _proc_cpu_seconds(self._popen.pid) if self._popen is not None else None
        return self._cpu_before + (now or 0.0)
