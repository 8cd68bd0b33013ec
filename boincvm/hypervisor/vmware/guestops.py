"""The VIX guest-operations channel of the VMware backend (``-gu/-gp`` on every vmrun call).

A program is started with ``runProgramInGuest -noWait /bin/sh -c SCRIPT``, where SCRIPT is a
:func:`~boincvm.hypervisor.vmware.config.wrapper_script` that leaves ``pid``, ``stdout``,
``stderr`` and ``rc`` in ``<guest_tmp>/job-<n>``: neither vmrun nor VIX can report the exit
code of a program started without waiting. Polls copy ``rc`` out; while it is absent they
look, every :data:`LIVENESS_INTERVAL` seconds, for the shell's PID in ``listProcessesInGuest``.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from boincvm import proc
from boincvm.errors import GuestToolsMissing
from boincvm.hypervisor.base import GuestProcess, ProcessStatus
from boincvm.hypervisor.vmware import vmrun as vr
from boincvm.hypervisor.vmware.config import wrapper_script

#: Runs one vmrun command on this VM with the guest credentials.
Call = Callable[[str, Sequence[str]], proc.Completed]
OUTPUT_TAIL = 64 * 1024
#: Seconds between process-list checks of a guest program whose exit code has not appeared.
LIVENESS_INTERVAL = 5.0
#: A shell reports "killed by signal N" as exit status 128 + N.
SIGNAL_BASE = 128


@dataclass(frozen=True)
class _Job:
    """A started guest program: its job directory, its shell's PID once known, the last liveness check."""

    directory: str
    guest_pid: int | None = None
    checked: float = field(default_factory=time.monotonic)


def status_from(code: int, out: bytes, err: bytes) -> ProcessStatus:
    """The status of a program whose wrapper wrote exit status ``code`` (128+N: signal N)."""
    if SIGNAL_BASE < code <= SIGNAL_BASE + 64:
        # sh reports a death by signal N as 128+N and cannot tell it from exit(128+N).
        return ProcessStatus(running=False, signal=code - SIGNAL_BASE, stdout_tail=out, stderr_tail=err)
    return ProcessStatus(running=False, exit_code=code, stdout_tail=out, stderr_tail=err)


class GuestopsChannel:
    """Guest programs and files through VIX guest operations.

    Args:
        call: runs one vmrun command on this VM, logged in as the guest user (the login is
            resolved lazily, so a missing one raises UnsupportedOperation at first use).
        guest_tmp: the guest directory for job directories.
        next_job: returns a fresh job number.
        scratch: returns a fresh host path for temporary copies.
    """

    def __init__(self, call: Call, guest_tmp: str, next_job: Callable[[], int], scratch: Callable[[], Path]):
        self.call = call
        self.guest_tmp = guest_tmp
        self.next_job = next_job
        self.scratch = scratch
        self._jobs: dict[int, _Job] = {}

    def after_start(self) -> None:
        """Nothing to set up after power-on."""

    def forget(self) -> None:
        """Drop what is known about running jobs (after a revert)."""
        self._jobs.clear()

    def wait_ready(self, deadline: float) -> None:
        """Retry a harmless guest operation: ``running`` comes slightly before they work.

        Raises:
            GuestToolsMissing: guest operations still fail at ``deadline``.
            GuestCredentialsRejected: the guest refused the credentials (not retried).
        """
        delay = 0.05
        while True:
            try:
                self.call("directoryExistsInGuest", ["/"])
                return
            except GuestToolsMissing:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    # -- programs ----------------------------------------------------------------------------
    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> GuestProcess:
        """Start the wrapper with ``runProgramInGuest -noWait``."""
        n = self.next_job()
        job = _Job(f"{self.guest_tmp}/job-{n}")
        script = wrapper_script(job.directory, argv, env, cwd)
        # vmrun joins the arguments and the guest runs '"prog" args' through a shell: quote.
        self.call("runProgramInGuest", ["-noWait", "/bin/sh", "-c", shlex.quote(script)])
        self._jobs[n] = job
        return GuestProcess(n, tuple(argv))

    def poll(self, proc: GuestProcess) -> ProcessStatus:
        """Read the job's ``rc``; while absent, check its shell's PID now and then."""
        job = self._jobs.setdefault(proc.pid, _Job(f"{self.guest_tmp}/job-{proc.pid}", checked=0.0))
        status = self._finished(job)
        if status is not None:
            return status
        # Each vmrun call costs a VIX connection: look at the process list only now and then.
        now = time.monotonic()
        if now - job.checked < LIVENESS_INTERVAL:
            return ProcessStatus(running=True)
        job = self._jobs[proc.pid] = replace(job, checked=now)
        if job.guest_pid is None:
            pid = self.read(f"{job.directory}/pid", 64)
            if pid is None or not pid.strip().isdigit():
                return ProcessStatus(running=True)
            job = self._jobs[proc.pid] = replace(job, guest_pid=int(pid.strip()))
        listing = vr.parse_processes(self.call("listProcessesInGuest", []).text)
        # An unparsable listing (the format is unverified on real hosts) proves nothing: keep waiting.
        if not listing or any(p.pid == job.guest_pid for p in listing):
            return ProcessStatus(running=True)
        status = self._finished(job)  # it may have ended between the two looks
        if status is not None:
            return status
        return ProcessStatus(
            running=False, stderr_tail=b"vmware: the guest program vanished without an exit status"
        )

    def _finished(self, job: _Job) -> ProcessStatus | None:
        rc = self.read(f"{job.directory}/rc", 64)
        if rc is None or not rc.strip().lstrip(b"-").isdigit():
            return None
        out = self._tail(f"{job.directory}/stdout")
        err = self._tail(f"{job.directory}/stderr")
        return status_from(int(rc.strip()), out, err)

    def _tail(self, guest_path: str) -> bytes:
        host = self.fetch(guest_path)
        if host is None:
            return b""
        try:
            with host.open("rb") as f:
                f.seek(max(0, host.stat().st_size - OUTPUT_TAIL))
                return f.read()
        finally:
            host.unlink(missing_ok=True)

    # -- files -------------------------------------------------------------------------------
    def copy_to(self, host_path: Path, guest_path: str) -> None:
        """``CopyFileFromHostToGuest``.

        Raises:
            OutputError: the guest directory does not exist.
        """
        self.call("CopyFileFromHostToGuest", [str(host_path), guest_path])

    def fetch(self, guest_path: str) -> Path | None:
        """``CopyFileFromGuestToHost`` to a scratch file; its path, or None when the guest file is missing."""
        host = self.scratch()
        try:
            self.call("CopyFileFromGuestToHost", [guest_path, str(host)])
        except vr.GuestFileMissing:
            host.unlink(missing_ok=True)
            return None
        except BaseException:
            host.unlink(missing_ok=True)
            raise
        return host

    def read(self, guest_path: str, max_bytes: int) -> bytes | None:
        """At most ``max_bytes`` of a guest file, or None when it is missing."""
        return read_fetched(self.fetch, guest_path, max_bytes)


def read_fetched(fetch: Callable[[str], Path | None], guest_path: str, max_bytes: int) -> bytes | None:
    """At most ``max_bytes`` of a guest file copied out by ``fetch`` (a channel's, which returns
    a host copy to consume, or None when the guest file is missing); the copy is removed."""
    host = fetch(guest_path)
    if host is None:
        return None
    try:
        with host.open("rb") as f:
            return f.read(max_bytes)
    finally:
        host.unlink(missing_ok=True)
