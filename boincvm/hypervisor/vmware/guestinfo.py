"""The credential-free guest channel of the VMware backend: guestinfo variables plus a shared folder.

No guest login is involved: ``vmrun readVariable/writeVariable VMX guestVar NAME`` reach the
guest's ``guestinfo.*`` namespace without one, and a shared folder (``.host:/boinc``, mounted by
open-vm-tools at ``/mnt/hgfs/boinc``) carries files and job results. The guest side is
:data:`~boincvm.hypervisor.vmware.config.AGENT_SCRIPT`, installed in the image as a boot service.

A job is a :func:`~boincvm.hypervisor.vmware.config.wrapper_script` line whose job directory is
on the share, so polling reads host files and costs no vmrun call at all. Files move through
``<share>/xfer``: the host copies a file there and a job ``cp`` puts it in place, and the reverse.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from boincvm import proc
from boincvm.errors import GuestToolsMissing, OutputError, VmTimeout
from boincvm.hypervisor.base import GuestProcess, ProcessStatus
from boincvm.hypervisor.vmware.config import SHARE_MOUNT, wrapper_script
from boincvm.hypervisor.vmware.guestops import status_from

Call = Callable[[str, Sequence[str]], proc.Completed]
OUTPUT_TAIL = 64 * 1024
_MISSING = 3  # exit status of a transfer job whose source file does not exist


class GuestinfoChannel:
    """Runs guest programs and moves files through the in-guest agent, without guest credentials.

    Args:
        call: runs one vmrun command on this VM (``call("readVariable", [...])``).
        share: the host directory shared with the guest.
        next_job: returns a fresh job number.
        timeout: seconds to wait for the agent to take a job, and for a file transfer.
    """

    def __init__(self, call: Call, share: Path, next_job: Callable[[], int], timeout: float) -> None:
        self.call = call
        self.share = share
        self.next_job = next_job
        self.timeout = timeout

    def read_var(self, name: str) -> str | None:
        """``guestinfo.NAME``, or None when unset."""
        value = self.call("readVariable", ["guestVar", name]).text.rstrip("\r\n")
        return value or None

    def after_start(self) -> None:
        """Turn shared folders on for the running VM (a revert restores their old state)."""
        self.call("enableSharedFolders", [])

    def forget(self) -> None:
        """Nothing to forget after a revert: job state lives on the (unreverted) share."""

    def wait_ready(self, deadline: float) -> None:
        """Wait for the agent to announce itself in ``guestinfo.boinc.agent``.

        Raises:
            GuestToolsMissing: it did not before ``deadline`` (a ``time.monotonic`` instant).
        """
        delay = 0.05
        while self.read_var("boinc.agent") != "ready":
            if time.monotonic() + delay > deadline:
                raise GuestToolsMissing(
                    "vmware: the boincvm guest agent did not announce itself (guestinfo.boinc.agent)",
                    hint="install the agent in the image (vmware_config.AGENT_SCRIPT), or configure guest "
                    "credentials (channel = guestops)",
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    # -- programs ----------------------------------------------------------------------------
    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> GuestProcess:
        """Hand a job to the agent and wait until it has taken it.

        Raises:
            VmTimeout: the agent did not acknowledge the job in time.
        """
        n = self.next_job()
        (self.share / "jobs").mkdir(parents=True, exist_ok=True)
        script = wrapper_script(f"{SHARE_MOUNT}/jobs/{n}", argv, env, cwd)
        self.call("writeVariable", ["guestVar", "boinc.job", f"{n} {script}"])
        deadline = time.monotonic() + self.timeout
        delay = 0.02
        while self.read_var("boinc.ack") != str(n):
            if time.monotonic() > deadline:
                raise VmTimeout(f"vmware: the guest agent did not take job {n} within {self.timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        return GuestProcess(n, tuple(argv))

    def poll(self, proc: GuestProcess) -> ProcessStatus:
        """Read the job's files on the share."""
        d = self.share / "jobs" / str(proc.pid)
        try:
            code = int((d / "rc").read_text().strip())
        except (OSError, ValueError):
            return ProcessStatus(running=True)
        return status_from(code, _tail(d / "stdout"), _tail(d / "stderr"))

    def _run(self, argv: Sequence[str]) -> ProcessStatus:
        proc = self.start(argv, {}, None)
        deadline = time.monotonic() + self.timeout
        delay = 0.02
        while (status := self.poll(proc)).running:
            if time.monotonic() > deadline:
                raise VmTimeout(f"vmware: a file transfer in the guest took more than {self.timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        shutil.rmtree(self.share / "jobs" / str(proc.pid), ignore_errors=True)
        return status

    # -- files -------------------------------------------------------------------------------
    def _xfer(self) -> tuple[Path, str]:
        (self.share / "xfer").mkdir(parents=True, exist_ok=True)
        name = f"x{time.monotonic_ns()}"
        return self.share / "xfer" / name, f"{SHARE_MOUNT}/xfer/{name}"

    def copy_to(self, host_path: Path, guest_path: str) -> None:
        """Copy through the share, then ``cp`` into place in the guest.

        Raises:
            OutputError: the guest could not write ``guest_path``.
        """
        host_tmp, guest_tmp = self._xfer()
        try:
            shutil.copyfile(host_path, host_tmp)
            status = self._run(["cp", "--", guest_tmp, guest_path])
        finally:
            host_tmp.unlink(missing_ok=True)
        if not status.succeeded:
            why = status.stderr_tail.decode(errors="replace").strip()
            raise OutputError(f"vmware: the guest could not write {guest_path}: {why}")

    def fetch(self, guest_path: str) -> Path | None:
        """Copy a guest file onto the share and return its host path, or None when it does not exist.

        Raises:
            OutputError: the guest could not read it.
        """
        host_tmp, guest_tmp = self._xfer()
        status = self._run(["/bin/sh", "-c", f'test -f "$1" || exit {_MISSING}; cp -- "$1" "$2"', "sh",
                            guest_path, guest_tmp])  # fmt: skip
        if status.exit_code == _MISSING:
            return None
        if not status.succeeded:
            host_tmp.unlink(missing_ok=True)
            why = status.stderr_tail.decode(errors="replace").strip()
            raise OutputError(f"vmware: the guest could not read {guest_path}: {why}")
        return host_tmp


def _tail(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - OUTPUT_TAIL))
            return f.read()
    except OSError:
        return b""
