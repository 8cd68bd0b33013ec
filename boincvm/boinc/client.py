"""A local BOINC client emulator: runs one task the way the 7.20.5 client does.

:class:`LocalClient` lays out the project and slot directories, writes
``init_data.xml``, creates ``boinc_mmap_file``, starts the app as a separate process in
the slot and then, on every :meth:`LocalClient.poll` (the client polls once a second):
sends a heartbeat, passes queued process-control requests one at a time, reads the app's
status, and when the process has exited classifies the exit exactly as
``ACTIVE_TASK::handle_exited_app`` does. Restarts (after a quit, a premature or
temporary exit, a kill) happen in the same slot with ``wu_cpu_time`` set to the last
checkpoint's CPU time, as the client does.

The caller drives time: ``run-local`` and tests call :meth:`poll`, :meth:`wait` or
:meth:`run`, and inject :meth:`suspend`, :meth:`resume`, :meth:`quit`, :meth:`abort`
and :meth:`kill` when they want. Not emulated: CPU throttling, the elapsed-time, disk
and memory limits, trickle/upload transfers, process priorities.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from boincvm import proc
from boincvm.boinc.errors import ClientError, ClientTimeout
from boincvm.boinc.files import (
    INIT_DATA_FILE,
    MAX_PREMATURE_EXITS,
    STDERR_FILE,
    TASK_STATE_FILE,
    TEMPORARY_EXIT_FILE,
    TRICKLE_UP_FILE,
    read_finish_file,
)
from boincvm.boinc.init_data import SHM_KEY_MMAP, HostInfo, InitData, write_init_data
from boincvm.boinc.outcome import Outcome, OutcomeKind, TaskState, TaskStatus, classify_exit
from boincvm.boinc.shm import HAVE_NEW_TRICKLE_UP, MMAP_FILE_NAME, ClientChannels, Control, SharedMemory
from boincvm.boinc.slot import (
    LocalTask,
    OutputResult,
    SlotLayout,
    clean_slot,
    collect_outputs,
    escape_project_url,
    install_project_files,
    link_slot_files,
    parse_command_line,
)
from boincvm.xmlio import escape_text

log = logging.getLogger(__name__)

#: Client version written into init_data.xml.
CLIENT_VERSION = (7, 20, 5)
STDERR_TAIL_BYTES = 63 * 1024


def _available_ram() -> float:
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) * 0.9
    except (ValueError, OSError):
        return 8e9


@dataclass(frozen=True)
class ClientOptions:
    """How the emulator behaves; defaults are the 7.20.5 client's.

    Attributes:
        poll_period: seconds between polls in :meth:`LocalClient.wait` (client: 1 s).
        checkpoint_period: the ``disk_interval`` preference written as ``checkpoint_period``.
        quit_timeout: SIGKILL a task that has not exited this long after ``<quit/>``.
        abort_timeout: the same after ``<abort/>``.
        control_timeout: kill and restart a task whose control request sat unread this long.
        client_pid: the pid written to init_data: None for this process, 0 for none (the
            app then watches heartbeats instead), or any pid.
        launcher: arguments put before the program (e.g. the Python interpreter), where
            the client would exec the main program directly.
        env: extra environment variables for the app.
        new_session: start the app in its own session (so a terminal's Ctrl-C reaches the
            emulator, which then quits the task, and not the app).
        max_wss: ``max_wss`` sent in heartbeats (bytes of RAM tasks may use).
        clean_slot: empty the slot after the final exit, as the client does.
        host_info: the host described in init_data.
    """

    poll_period: float = 1.0
    checkpoint_period: float = 60.0
    quit_timeout: float = 60.0
    abort_timeout: float = 60.0
    control_timeout: float = 180.0
    client_pid: int | None = None
    launcher: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    new_session: bool = True
    max_wss: float = field(default_factory=_available_ram)
    clean_slot: bool = True
    host_info: HostInfo = field(default_factory=HostInfo)


class LocalClient:
    """Runs one :class:`LocalTask` in a slot of ``data_dir``, as the BOINC client would.

    Use as a context manager, or call :meth:`close`: a running app is killed on close.
    """

    def __init__(
        self,
        data_dir: Path,
        task: LocalTask,
        *,
        slot: int = 0,
        options: ClientOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.task = task
        self.options = ClientOptions() if options is None else options
        self.layout = SlotLayout(data_dir.resolve(), escape_project_url(task.project_url), slot)
        self._clock = clock
        self._proc: subprocess.Popen[bytes] | None = None
        self._shm: SharedMemory | None = None
        self._channels: ClientChannels | None = None
        self._queue: list[Control] = []
        self._blocked_since: float | None = None
        self._pending_deadline: float | None = None
        self._status = TaskStatus()
        self._installed = False
        self._last_poll: float | None = None
        self._premature_exits = 0
        self._computation_deadline = time.time() + task.delay_bound
        self.heartbeats_enabled = True
        self.network_suspended = False

    # ----------------------------------------------------------------------------------
    # paths and state

    @property
    def slot_dir(self) -> Path:
        """The slot directory the app runs in."""
        return self.layout.slot_dir

    @property
    def project_dir(self) -> Path:
        """The project directory holding the task's files."""
        return self.layout.project_dir

    @property
    def status(self) -> TaskStatus:
        """The current snapshot of what the client knows."""
        return self._status

    @property
    def running(self) -> bool:
        """The app process has been started and has not been reaped."""
        return self._proc is not None

    # ----------------------------------------------------------------------------------
    # starting

    def init_data(self) -> InitData:
        """The ``init_data.xml`` the next start writes."""
        t = self.task
        pid = os.getpid() if self.options.client_pid is None else self.options.client_pid
        major, minor, release = CLIENT_VERSION
        return InitData(
            major_version=major,
            minor_version=minor,
            release=release,
            app_version=t.version_num,
            app_name=t.app_name,
            user_name="boincvm",
            project_dir=str(self.project_dir),
            boinc_dir=str(self.layout.data_dir),
            authenticator="0123456789abcdef0123456789abcdef",
            wu_name=t.wu_name,
            result_name=t.result_name,
            shm_key=SHM_KEY_MMAP,
            slot=self.layout.slot,
            client_pid=pid,
            wu_cpu_time=self._status.checkpoint_cpu_time,
            starting_elapsed_time=self._status.checkpoint_elapsed_time,
            resource_share_fraction=1.0,
            checkpoint_period=self.options.checkpoint_period,
            fraction_done_start=0.0,
            fraction_done_end=1.0,
            ncpus=t.ncpus,
            rsc_fpops_est=t.rsc_fpops_est,
            rsc_fpops_bound=t.rsc_fpops_bound,
            rsc_memory_bound=t.rsc_memory_bound,
            rsc_disk_bound=t.rsc_disk_bound,
            computation_deadline=self._computation_deadline,
            host_info=self.options.host_info,
            app_files=tuple(f.name for f in t.app_files),
        )

    def argv(self) -> list[str]:
        """The command the next start runs (cwd = slot): the main program by its path
        relative to the slot, then the workunit's and app version's command lines."""
        program = self.layout.from_slot(self.task.main_program.name)
        extra = parse_command_line(f"{self.task.command_line} {self.task.app_cmdline}")
        return [*self.options.launcher, program, *extra]

    def start(self) -> None:
        """Set up the slot and start the app (``ACTIVE_TASK::start``).

        Raises:
            ClientError: the task is already running or its files are unusable.
            CommandNotFound: the program (or launcher) cannot be executed.
        """
        if self._proc is not None:
            raise ClientError(f"task {self.task.result_name} is already running")
        if not self._installed:
            install_project_files(self.task, self.layout)
            self._installed = True
        slot = self.slot_dir
        slot.mkdir(parents=True, exist_ok=True)
        write_init_data(slot / INIT_DATA_FILE, self.init_data())
        link_slot_files(self.task, self.layout)
        (slot / TEMPORARY_EXIT_FILE).unlink(missing_ok=True)
        if self._shm is None:
            self._shm = SharedMemory.create(slot / MMAP_FILE_NAME)
            self._channels = ClientChannels(self._shm)
        self._shm.reset()
        self._queue.clear()
        self._blocked_since = None
        self._pending_deadline = None
        env = dict(self.options.env or {})
        libs = f"../../projects/{self.layout.project_dir_name}:.:../.."
        old = os.environ.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{libs}:{old}" if old else libs
        with (slot / STDERR_FILE).open("ab") as stderr:
            self._proc = proc.spawn(
                self.argv(),
                stdout=subprocess.DEVNULL,
                stderr=stderr.fileno(),
                cwd=slot,
                env=env,
                new_session=self.options.new_session,
            )
        self._last_poll = self._clock()
        self._status = replace(
            self._status,
            state=TaskState.EXECUTING,
            starts=self._status.starts + 1,
            pid=self._proc.pid,
            status_messages=0,
            heartbeats_sent=0,
        )
        log.info("started %s (pid %d) in %s", self.task.result_name, self._proc.pid, slot)

    # ----------------------------------------------------------------------------------
    # control requests (ACTIVE_TASK::suspend/unsuspend/request_exit/request_abort)

    def _queue_send(self, request: Control) -> None:
        assert self._channels is not None
        if not self._queue and self._channels.send_control(request):
            self._blocked_since = None
            return
        self._queue.append(request)
        if self._blocked_since is None:
            self._blocked_since = self._clock()

    def _purge(self, request: Control) -> bool:
        if self._queue and self._queue[-1] is request:
            self._queue.pop()
            return True
        return False

    def _require_running(self, what: str) -> None:
        if self._proc is None or self._channels is None:
            raise ClientError(f"cannot {what} task {self.task.result_name}: it is not running")

    def _ask(
        self,
        what: str,
        request: Control,
        state: TaskState,
        *,
        cancels: Control | None = None,
        timeout: float | None = None,
    ) -> None:
        """Send ``request`` (or withdraw a queued ``cancels`` instead, as the client does) and
        enter ``state``; with ``timeout``, the app is killed if it has not exited by then.

        Raises:
            ClientError: the task is not running.
        """
        self._require_running(what)
        if cancels is None or not self._purge(cancels):
            self._queue_send(request)
        if timeout is not None:
            self._pending_deadline = self._clock() + timeout
        self._status = replace(self._status, state=state)

    def suspend(self) -> None:
        """Send ``<suspend/>`` (or cancel a queued ``<resume/>``), as a left-in-memory preemption.

        Raises:
            ClientError: the task is not running.
        """
        self._ask("suspend", Control.SUSPEND, TaskState.SUSPENDED, cancels=Control.RESUME)

    def resume(self) -> None:
        """Send ``<resume/>`` (or cancel a queued ``<suspend/>``).

        Raises:
            ClientError: the task is not running.
        """
        self._ask("resume", Control.RESUME, TaskState.EXECUTING, cancels=Control.SUSPEND)

    def quit(self) -> None:
        """Send ``<quit/>``: the app should exit 0 and is restarted later; killed after
        ``quit_timeout``.

        Raises:
            ClientError: the task is not running.
        """
        self._ask("quit", Control.QUIT, TaskState.QUIT_PENDING, timeout=self.options.quit_timeout)

    def abort(self) -> None:
        """Send ``<abort/>``: the app should exit 194; killed after ``abort_timeout``.

        Raises:
            ClientError: the task is not running.
        """
        self._ask("abort", Control.ABORT, TaskState.ABORT_PENDING, timeout=self.options.abort_timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal to the app process (inject a crash). Does nothing if not running."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    # ----------------------------------------------------------------------------------
    # polling

    def poll(self) -> Outcome | None:
        """One client poll: heartbeat, queued requests, status, timeouts, exit check.

        Returns:
            The outcome when the process has exited during this poll, else None.
        """
        if self._proc is None or self._channels is None:
            return None
        now = self._clock()
        if self._last_poll is not None:
            self._status = replace(
                self._status, elapsed_time=self._status.elapsed_time + (now - self._last_poll)
            )
        self._last_poll = now
        if self._proc.poll() is None:
            self._poll_running(now)
            if self._proc.poll() is None:
                return None
        return self._handle_exit()

    def _poll_running(self, now: float) -> None:
        assert self._proc is not None and self._channels is not None
        if self._queue:
            if now - (self._blocked_since or now) > self.options.control_timeout:
                log.warning("%s left a control request unread; killing it", self.task.result_name)
                self._proc.kill()
            elif self._channels.send_control(self._queue[0]):
                self._queue.pop(0)
                self._blocked_since = now if self._queue else None
        if self._pending_deadline is not None and now > self._pending_deadline:
            log.warning("%s did not exit in time; killing it", self.task.result_name)
            self._proc.kill()
        if self.heartbeats_enabled and self._channels.send_heartbeat(
            _rss(self._proc.pid), self.options.max_wss, network_suspended=self.network_suspended
        ):
            self._status = replace(self._status, heartbeats_sent=self._status.heartbeats_sent + 1)
        self._read_messages()

    def _read_messages(self) -> None:
        assert self._channels is not None
        report = self._channels.receive_status()
        if report is not None:
            s = self._status
            checkpointed = report.checkpoint_cpu_time != s.checkpoint_cpu_time
            s = replace(
                s,
                fraction_done=report.fraction_done if report.fraction_done else s.fraction_done,
                current_cpu_time=report.current_cpu_time,
                checkpoint_cpu_time=report.checkpoint_cpu_time,
                fpops_cumulative=report.fpops_cumulative
                if report.fpops_cumulative is not None
                else s.fpops_cumulative,
                intops_cumulative=(
                    report.intops_cumulative if report.intops_cumulative is not None else s.intops_cumulative
                ),
                other_pid=report.other_pid if report.other_pid is not None else s.other_pid,
                want_network=report.want_network,
                status_messages=s.status_messages + 1,
            )
            if checkpointed:
                s = replace(s, checkpoint_elapsed_time=s.elapsed_time)
                self._premature_exits = 0
            self._status = s
            if checkpointed:
                self._write_task_state()
        trickle = self._channels.receive_trickle_up()
        if trickle is not None and HAVE_NEW_TRICKLE_UP.strip() in trickle:
            src = self.slot_dir / TRICKLE_UP_FILE
            if src.exists():
                # BOINC names it by the second; a later one in the same second gets the next.
                stamp = int(time.time())
                while (dst := self.project_dir / f"trickle_up_{self.task.result_name}_{stamp}.xml").exists():
                    stamp += 1
                src.replace(dst)

    def _write_task_state(self) -> None:
        s = self._status
        (self.slot_dir / TASK_STATE_FILE).write_text(
            "<active_task>\n"
            f"    <project_master_url>{escape_text(self.task.project_url)}</project_master_url>\n"
            f"    <result_name>{escape_text(self.task.result_name)}</result_name>\n"
            f"    <checkpoint_cpu_time>{s.checkpoint_cpu_time:f}</checkpoint_cpu_time>\n"
            f"    <checkpoint_elapsed_time>{s.checkpoint_elapsed_time:f}</checkpoint_elapsed_time>\n"
            f"    <fraction_done>{s.fraction_done:f}</fraction_done>\n"
            "    <peak_working_set_size>0</peak_working_set_size>\n"
            "    <peak_swap_size>0</peak_swap_size>\n"
            "    <peak_disk_usage>0</peak_disk_usage>\n"
            "</active_task>\n",
            encoding="utf-8",
        )

    def _handle_exit(self) -> Outcome:
        assert self._proc is not None
        returncode = self._proc.wait()
        self._read_messages()  # the final status and trickle messages
        self._proc = None
        finish = read_finish_file(self.slot_dir)
        exit_ = classify_exit(self._status.state, returncode, finish, self.slot_dir)
        kind, message = exit_.kind, exit_.message
        if kind.counts_as_premature:
            self._premature_exits += 1
            if self._premature_exits > MAX_PREMATURE_EXITS:
                kind, message = OutcomeKind.TOO_MANY_EXITS, "too many exits without a checkpoint"
        will_restart = kind.restarts
        self._status = replace(
            self._status, state=TaskState.UNINITIALIZED if will_restart else TaskState.EXITED, pid=None
        )
        outputs: tuple[OutputResult, ...] = ()
        stderr = ""
        if not will_restart:
            outputs = collect_outputs(self.task, self.layout)
            stderr = self._stderr_tail()
            if finish is None:
                finish = read_finish_file(self.slot_dir)
            self._close_shm()
            if self.options.clean_slot:
                clean_slot(self.slot_dir)
        log.info("%s: %s", self.task.result_name, message)
        code = returncode if returncode >= 0 else None
        sig = -returncode if returncode < 0 else None
        return Outcome(
            kind,
            will_restart,
            code,
            sig,
            finish,
            exit_.temporary_exit,
            message,
            self._status,
            outputs,
            stderr,
        )

    def _stderr_tail(self) -> str:
        path = self.slot_dir / STDERR_FILE
        try:
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - STDERR_TAIL_BYTES))
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    # ----------------------------------------------------------------------------------
    # waiting

    def wait(self, timeout: float, *, until: Callable[[TaskStatus], bool] | None = None) -> Outcome | None:
        """Poll every ``poll_period`` until the process exits (or ``until`` holds).

        Returns:
            The outcome of the exit, or None when ``until`` became true first.

        Raises:
            ClientTimeout: neither happened within ``timeout`` seconds (the app keeps running).
        """
        deadline = self._clock() + timeout
        while True:
            outcome = self.poll()
            if outcome is not None:
                return outcome
            if until is not None and until(self._status):
                return None
            if self._proc is None:
                raise ClientError(f"task {self.task.result_name} is not running")
            if self._clock() >= deadline:
                raise ClientTimeout(f"task {self.task.result_name} still running after {timeout:g} s")
            time.sleep(self.options.poll_period)

    def run(self, timeout: float, *, max_starts: int = 10, max_backoff: float = 0.0) -> Outcome:
        """Start the task and restart it as the client would, until a final outcome.

        Args:
            timeout: seconds for the whole run.
            max_starts: give up restarting after this many starts (returns the last outcome).
            max_backoff: wait at most this long for a temporary exit's delay before the
                restart (the client waits the whole delay).

        Raises:
            ClientTimeout: no final outcome within ``timeout``.
            ClientError, CommandNotFound: see :meth:`start`.
        """
        deadline = self._clock() + timeout
        while True:
            self.start()
            outcome = self.wait(max(deadline - self._clock(), 0.0))
            assert outcome is not None
            if not outcome.will_restart or self._status.starts >= max_starts:
                return outcome
            if outcome.temporary_exit is not None:
                time.sleep(min(outcome.temporary_exit.delay, max_backoff))

    # ----------------------------------------------------------------------------------
    # ending

    def _close_shm(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
            self._channels = None

    def close(self) -> None:
        """Kill a running app and unmap the shared memory (the slot stays as it is)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None
        self._close_shm()

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rss(pid: int) -> float:
    """Resident set size of a process in bytes (0 when unknown)."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
        return float(int(fields[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, IndexError, ValueError):
        return 0.0
