"""The app runtime: what a wrapper needs of BOINC's API, in pure Python.

:class:`BoincApp` plays the part of ``boinc_init``/``boinc_finish`` and the API's timer
thread with the options BOINC's own wrapper uses (check heartbeat, handle process
control, no direct action): it reads heartbeats and process-control requests, sends a
status message every second, and exposes what it learned as flags. The wrapper reacts
(stop the VM, snapshot, exit); this module never exits the process itself. ``finish``,
``temporary_exit`` and the ``exit_*`` methods write what must be written and return the
exit code the process should end with.

Typical main loop::

    try:
        app = BoincApp.start()
    except SlotLocked as err:
        return slot_locked_exit(Path.cwd(), err)  # temporary exit, as BOINC's API does
    with app.ticking():                          # or call app.tick() about once a second
        while not done:
            if app.quit_requested or app.client_gone:
                stop_vm(); return app.exit_quit()
            if app.abort_requested:
                stop_vm(); return app.exit_abort()
            pause_vm() if app.suspended else resume_vm()
            app.report(fraction, cpu_time=vm_cpu_seconds)
            if app.time_to_checkpoint():
                snapshot(); app.checkpoint_completed(cpu_time=vm_cpu_seconds)
    return app.finish(0)
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from boincvm.boinc.errors import BoincApiError, SlotLocked
from boincvm.boinc.files import (
    INIT_DATA_FILE,
    LOCKFILE,
    LOCKFILE_TIMEOUT,
    TRICKLE_UP_FILE,
    ExitCode,
    SlotLock,
    resolve_filename,
    write_finish_file,
    write_temporary_exit,
)
from boincvm.boinc.init_data import InitData, behind_wsl_wrapper, read_init_data
from boincvm.boinc.shm import MMAP_FILE_NAME, AppChannels, AppStatus, Control, Heartbeat, SharedMemory

log = logging.getLogger(__name__)

#: Seconds without a heartbeat after which the API gives up on the client (``HEARTBEAT_GIVEUP_SECS``).
HEARTBEAT_GIVEUP_SECS = 30.0
#: How often the API checks that the client process still exists.
CLIENT_PID_CHECK_PERIOD = 10.0
#: How long ``boinc_finish`` waits at most for the client to read the status message before
#: the final one (the client reads one a second).
FINISH_WAIT = 2.0


@dataclass(frozen=True)
class AppOptions:
    """Timing of the app runtime; the defaults are BOINC's, tests shorten them.

    Attributes:
        heartbeat_timeout: without a client pid in init_data, the client counts as gone
            after this many seconds without ``<heartbeat/>``.
        client_check_period: with a client pid, how often to check the process exists.
        status_period: seconds between status messages.
        lock_timeout: how long to wait for a busy ``boinc_lockfile``.
        finish_wait: at most this long, ``finish`` waits for the client to read the
            status message before the final one (the final one it reads after the exit).
        min_checkpoint_period: checkpoint no more often than this even when the client
            asks for more (``boinc_set_min_checkpoint_period``).
    """

    heartbeat_timeout: float = HEARTBEAT_GIVEUP_SECS
    client_check_period: float = CLIENT_PID_CHECK_PERIOD
    status_period: float = 1.0
    lock_timeout: float = LOCKFILE_TIMEOUT
    finish_wait: float = FINISH_WAIT
    min_checkpoint_period: float = 0.0


def process_cpu_time() -> float:
    """CPU seconds of this process and its reaped children (user + system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def slot_locked_exit(slot_dir: Path, err: SlotLocked) -> int:
    """Write the temporary-exit file BOINC's API writes when the slot lock is busy.

    Returns:
        0, the exit code to use.

    Raises:
        OSError: the file cannot be written.
    """
    write_temporary_exit(slot_dir, err.delay, err.reason)
    return 0


class BoincApp:
    """The app's side of the BOINC client protocol for one run of the process.

    Create it with :meth:`start`. All methods are safe to call from the main thread while
    :meth:`ticking` runs :meth:`tick` in the background.
    """

    def __init__(
        self,
        slot_dir: Path,
        init_data: InitData,
        channels: AppChannels | None,
        lock: SlotLock,
        options: AppOptions,
        clock: Callable[[], float] = time.monotonic,
        *,
        wsl: bool = False,
    ) -> None:
        self.slot_dir = slot_dir
        #: Started by BOINC's wsl_wrapper inside WSL (see :func:`behind_wsl_wrapper`).
        self.behind_wsl_wrapper = wsl
        self.init_data = init_data
        self.options = options
        self._channels = channels
        self._lock = lock
        self._clock = clock
        self._mutex = threading.RLock()
        now = clock()
        self._started = now
        self._last_heartbeat_at = now
        self._next_client_check = now + options.client_check_period
        # The first status one period after the start, as BOINC's API sends it: a task that ends
        # sooner finds the channel free for its final status and exits at once.
        self._next_status = now + options.status_period
        self._last_checkpoint_at = now
        self._suspended = False
        self._quit = False
        self._abort = False
        self._reread = False
        self._client_gone = False
        self._heartbeat: Heartbeat | None = None
        self._cpu_time: float | None = None  # this run's CPU seconds, as last reported
        self._checkpoint_cpu: float = 0.0  # this run's CPU seconds at the last checkpoint
        self._status = AppStatus(
            current_cpu_time=init_data.wu_cpu_time, checkpoint_cpu_time=init_data.wu_cpu_time
        )
        self._trickle_pending = False
        self._closed = False

    # ----------------------------------------------------------------------------------
    # start-up

    @classmethod
    def start(
        cls,
        slot_dir: Path | None = None,
        *,
        options: AppOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> BoincApp:
        """Take the slot lock, read ``init_data.xml`` and attach the shared memory.

        Without ``init_data.xml`` the app runs standalone (for debugging outside BOINC):
        no messages, never suspended, never told to quit.

        Args:
            slot_dir: the slot directory; the current directory by default (the client
                starts apps there).
            options: timing; BOINC's by default.
            clock: a monotonic clock (tests may pass their own).

        Raises:
            SlotLocked: another process holds ``boinc_lockfile`` after ``lock_timeout``
                seconds. BOINC's API then makes a temporary exit of 600 s; do the same with
                :func:`boincvm.boinc.files.write_temporary_exit` and exit 0.
            XmlError: ``init_data.xml`` is malformed.
            BoincApiError: the client asked for System V shared memory (the app version
                lacks ``<api_version>`` 6 or later) or the mmap file is unusable.
        """
        slot = Path.cwd() if slot_dir is None else slot_dir
        opts = AppOptions() if options is None else options
        lock = SlotLock(slot / LOCKFILE)
        if not lock.acquire(opts.lock_timeout):
            raise SlotLocked(f"{slot / LOCKFILE} is held by another process")
        try:
            init_path = slot / INIT_DATA_FILE
            if not init_path.exists():
                log.info("no %s in %s: running standalone", INIT_DATA_FILE, slot)
                return cls(slot, InitData(), None, lock, opts, clock)
            data = read_init_data(init_path)
            if behind_wsl_wrapper(data, slot):
                # BOINC's wsl_wrapper started us inside WSL: the Windows client's channel
                # is not reachable from here, so there are no messages either way.
                return cls(slot, data, None, lock, opts, clock, wsl=True)
            if not data.uses_mmap:
                raise BoincApiError(
                    f"the client gave shm_key {data.shm_key}: System V shared memory, "
                    "which boincvm does not speak",
                    hint="declare <api_version>7.20.0</api_version> in the app version "
                    "so the client uses the mmap file",
                )
            shm = SharedMemory.attach(slot / MMAP_FILE_NAME)
        except BaseException:
            lock.release()
            raise
        return cls(slot, data, AppChannels(shm), lock, opts, clock)

    # ----------------------------------------------------------------------------------
    # state

    @property
    def standalone(self) -> bool:
        """No client: no ``init_data.xml`` was found."""
        return self._channels is None and not self.behind_wsl_wrapper

    @property
    def suspended(self) -> bool:
        """The client asked the app to suspend and has not resumed it yet."""
        with self._mutex:
            return self._suspended

    @property
    def quit_requested(self) -> bool:
        """The client asked the app to quit (it will be restarted later): exit 0, no finish file."""
        with self._mutex:
            return self._quit

    @property
    def abort_requested(self) -> bool:
        """The client aborted the task: exit with :attr:`ExitCode.ABORTED_BY_CLIENT`."""
        with self._mutex:
            return self._abort

    @property
    def reread_requested(self) -> bool:
        """The client rewrote ``init_data.xml`` (e.g. proxy change); see :meth:`reread_init_data`."""
        with self._mutex:
            return self._reread

    @property
    def client_gone(self) -> bool:
        """The client died: its pid is gone (when init_data names one) or, without a pid,
        no heartbeat came for ``heartbeat_timeout`` seconds. Exit 0 like a quit."""
        with self._mutex:
            return self._client_gone

    @property
    def network_suspended(self) -> bool:
        """The last heartbeat said the client's network is suspended."""
        with self._mutex:
            return self._heartbeat is not None and self._heartbeat.network_suspended

    @property
    def last_heartbeat(self) -> Heartbeat | None:
        """The last heartbeat message read (memory figures), or None."""
        with self._mutex:
            return self._heartbeat

    @property
    def last_status(self) -> AppStatus:
        """The status the next message will carry (fraction done already mapped)."""
        with self._mutex:
            return self._current_status()

    @property
    def initial_cpu_time(self) -> float:
        """CPU seconds of the task's earlier runs, up to its last checkpoint (``wu_cpu_time``)."""
        return self.init_data.wu_cpu_time

    @property
    def project_dir(self) -> Path | None:
        """The project directory, as this process sees it (None when the client names none).

        Behind wsl_wrapper ``init_data.xml`` names it as the Windows client sees it
        (``C:\\ProgramData\\BOINC\\projects\\NAME``); inside WSL it is ``projects/NAME``
        two levels above the slot, as the client lays its data directory out.
        """
        named = self.init_data.project_dir
        if not named:
            return None
        if not self.behind_wsl_wrapper:
            return Path(named)
        name = named.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        return self.slot_dir.resolve().parent.parent / "projects" / name

    def resolve(self, logical: str) -> Path:
        """The physical path of a logical file name in the slot (``boinc_resolve_filename``)."""
        return resolve_filename(logical, self.slot_dir)

    def reread_init_data(self) -> InitData:
        """Re-read ``init_data.xml`` after a ``<reread_app_info/>`` and clear the flag.

        The CPU time carried over from earlier runs stays what it was at start.

        Raises:
            XmlError: the file is malformed.
            InputError: the file is missing.
        """
        data = read_init_data(self.slot_dir / INIT_DATA_FILE)
        with self._mutex:
            self.init_data = replace(data, wu_cpu_time=self.init_data.wu_cpu_time)
            self._reread = False
            return self.init_data

    # ----------------------------------------------------------------------------------
    # the timer

    def tick(self) -> Control:
        """Handle messages from the client and send the status if one is due.

        Call it at least once a second (or let :meth:`ticking` do it). Status messages
        are not sent while suspended, as the API does.

        Returns:
            The process-control requests read during this call (``Control.NONE`` if none).
        """
        with self._mutex:
            if self._channels is None or self._closed:
                return Control.NONE
            now = self._clock()
            beat = self._channels.receive_heartbeat()
            if beat is not None:
                self._heartbeat = beat
                if beat.alive:
                    self._last_heartbeat_at = now
            got = self._channels.receive_control()
            self._apply(got)
            self._check_client(now)
            if now >= self._next_status:
                self._next_status = now + self.options.status_period
                if not self._suspended:
                    self._channels.send_status(self._current_status())
            if self._trickle_pending and self._channels.send_trickle_up():
                self._trickle_pending = False
            return got

    @contextlib.contextmanager
    def ticking(self, period: float = 0.1) -> Iterator[BoincApp]:
        """Run :meth:`tick` every ``period`` seconds in a daemon thread while in the block."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                self.tick()
                stop.wait(period)

        thread = threading.Thread(target=loop, name="boinc-api-timer", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=5 * period + 1)

    def _apply(self, got: Control) -> None:
        if Control.SUSPEND in got:
            self._suspended = True
        if Control.RESUME in got:
            self._suspended = False
        if Control.QUIT in got:
            self._quit = True
        if Control.ABORT in got:
            self._abort = True
        if Control.REREAD_APP_INFO in got:
            self._reread = True
        if got:
            log.info("client requests: %s", got)

    def _check_client(self, now: float) -> None:
        if self._client_gone:
            return
        pid = self.init_data.client_pid
        if pid:
            if now < self._next_client_check:
                return
            self._next_client_check = now + self.options.client_check_period
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self._client_gone = True
                log.warning("BOINC client (pid %d) no longer exists", pid)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    self._client_gone = True
        elif now - self._last_heartbeat_at > self.options.heartbeat_timeout:
            self._client_gone = True
            log.warning("no heartbeat from the client for %.0f s", self.options.heartbeat_timeout)

    # ----------------------------------------------------------------------------------
    # reporting

    def report(
        self,
        fraction_done: float | None = None,
        *,
        cpu_time: float | None = None,
        fpops_cumulative: float | None = None,
        intops_cumulative: float | None = None,
        fpops_per_cpu_sec: float | None = None,
        intops_per_cpu_sec: float | None = None,
        other_pid: int | None = None,
        want_network: bool | None = None,
        bytes_sent: float | None = None,
        bytes_received: float | None = None,
    ) -> None:
        """Record progress; the next status message (within a second) carries it.

        Args:
            fraction_done: the app's own progress 0..1 (mapped into the client's
                ``fraction_done_start..end``); None keeps the last value.
            cpu_time: CPU seconds spent by this run of the task (for a wrapper: the VM's
                CPU time). The CPU time of earlier runs (``wu_cpu_time``) is added. Until
                given, the CPU time of this process and its reaped children is used.
            fpops_cumulative: floating-point operations done so far, for credit.
            intops_cumulative: integer operations done so far, for credit.
            fpops_per_cpu_sec: claimed floating-point speed, for credit.
            intops_per_cpu_sec: claimed integer speed, for credit.
            other_pid: a process the client should account and kill with the task.
            want_network: ask the client to keep the network available.
            bytes_sent: network bytes sent in this run.
            bytes_received: network bytes received in this run.
        """
        # The last boundary before the client: a NaN or an infinity would reach its
        # scheduler and credit as is (every comparison with NaN is false), so drop them.
        numbers = {
            "fpops_cumulative": fpops_cumulative,
            "intops_cumulative": intops_cumulative,
            "fpops_per_cpu_sec": fpops_per_cpu_sec,
            "intops_per_cpu_sec": intops_per_cpu_sec,
            "bytes_sent": bytes_sent,
            "bytes_received": bytes_received,
        }
        changes: dict[str, object] = {k: v for k, v in numbers.items() if _finite_or_none(v) is not None}
        changes.update(
            {k: v for k, v in (("other_pid", other_pid), ("want_network", want_network)) if v is not None}
        )
        fraction_done, cpu_time = _finite_or_none(fraction_done), _finite_or_none(cpu_time)
        with self._mutex:
            if fraction_done is not None:
                changes["fraction_done"] = self.init_data.fraction_for_client(
                    min(max(fraction_done, 0.0), 1.0)
                )
            self._status = replace(self._status, **changes)  # type: ignore[arg-type]
            if cpu_time is not None:
                self._cpu_time = cpu_time

    def _run_cpu(self) -> float:
        return process_cpu_time() if self._cpu_time is None else self._cpu_time

    def _current_status(self) -> AppStatus:
        base = self.init_data.wu_cpu_time
        return replace(
            self._status,
            current_cpu_time=base + self._run_cpu(),
            checkpoint_cpu_time=base + self._checkpoint_cpu,
        )

    def time_to_checkpoint(self) -> bool:
        """Whether a checkpoint is due (``checkpoint_period`` from init_data, 300 s if 0)."""
        period = max(self.init_data.effective_checkpoint_period, self.options.min_checkpoint_period)
        with self._mutex:
            return self._clock() - self._last_checkpoint_at >= period

    def checkpoint_completed(self, cpu_time: float | None = None) -> None:
        """Tell the client a checkpoint is committed (``boinc_checkpoint_completed``).

        The next status message carries the new checkpoint CPU time; the client then resets
        its count of exits without progress and, on a restart, gives that CPU time back as
        ``wu_cpu_time``.

        Args:
            cpu_time: this run's CPU seconds at the checkpoint; the last reported (or
                measured) value by default.
        """
        with self._mutex:
            if cpu_time is not None:
                self._cpu_time = cpu_time
            self._checkpoint_cpu = self._run_cpu()
            self._last_checkpoint_at = self._clock()
            self._next_status = self._clock()  # tell the client promptly

    def send_trickle_up(self, variety: str, body: str) -> Path:
        """Queue a trickle-up message (``boinc_send_trickle_up``): write ``trickle_up.xml``
        and announce it now, or at the next tick while the channel still holds an unread
        announcement.

        Raises:
            OSError: the file cannot be written.
        """
        path = self.slot_dir / TRICKLE_UP_FILE
        path.write_text(f"<variety>{variety}</variety>\n{body}", encoding="utf-8")
        with self._mutex:
            sent = self._channels is not None and not self._closed and self._channels.send_trickle_up()
            self._trickle_pending = not sent
        return path

    # ----------------------------------------------------------------------------------
    # ending

    def finish(self, status: int = 0, message: str | None = None, *, is_notice: bool = False) -> int:
        """End the task (``boinc_finish_message``): report fraction done 1, leave the final
        status for the client, write ``boinc_finish_called`` and release the slot.

        Returns:
            The exit code the process must exit with: ``status`` as the 8 bits Unix keeps,
            except that a non-zero status whose low 8 bits are 0 becomes
            :attr:`ExitCode.UNKNOWN` (exit 0 with a finish file would read as success).

        Raises:
            OSError: the finish file cannot be written.
        """
        with self._mutex:
            self._status = replace(self._status, fraction_done=self.init_data.fraction_for_client(1.0))
        self._flush_final_status()
        write_finish_file(self.slot_dir, status, message, is_notice=is_notice)
        self.close()
        code = status & 0xFF
        return int(ExitCode.UNKNOWN) if status != 0 and code == 0 else code

    def temporary_exit(self, delay: float, reason: str, *, is_notice: bool = False) -> int:
        """Ask to be restarted after ``delay`` seconds (``boinc_temporary_exit``).

        Returns:
            0, the exit code to use.

        Raises:
            OSError: the file cannot be written.
        """
        write_temporary_exit(self.slot_dir, delay, reason, is_notice=is_notice)
        self.close()
        return 0

    def exit_quit(self) -> int:
        """Release the slot after a quit request or a lost client; returns 0 (no finish file)."""
        self.close()
        return 0

    def exit_abort(self) -> int:
        """Release the slot after an abort request; returns 194 (``EXIT_ABORTED_BY_CLIENT``)."""
        self.close()
        return int(ExitCode.ABORTED_BY_CLIENT)

    def _flush_final_status(self) -> None:
        """Put the final status (and a trickle queued just before the end) in the channel, waiting
        only while the client has not read the one before. The client reads what is left there
        once the process has exited (``handle_exited_app`` calls ``get_app_status_msg`` and
        ``get_trickle_up_msg``), so nothing waits for that read: BOINC's own API sleeps 2 s here."""
        if self._channels is None:
            return
        deadline = self._clock() + self.options.finish_wait
        sent = False
        while self._clock() < deadline:
            with self._mutex:
                if self._closed:
                    return
                if self._trickle_pending and self._channels.send_trickle_up():
                    self._trickle_pending = False
                if not sent and not self._channels.status_pending():
                    sent = self._channels.send_status(self._current_status())
                if sent and not self._trickle_pending:
                    return
            time.sleep(0.05)

    def close(self) -> None:
        """Detach from the shared memory and release ``boinc_lockfile`` (idempotent)."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            if self._channels is not None:
                self._channels.shm.close()
            self._lock.release()
