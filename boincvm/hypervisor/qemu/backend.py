"""The QEMU backend: QMP for the machine, qemu-guest-agent for the guest.

One :class:`QemuBackend` drives one VM in one slot work directory::

    workdir/            mode 0700
      disk.qcow2        the copy-on-write overlay on the read-only base (holds snapshots)
      qmp.sock qga.sock the control and agent channels
      qemu.pid          written by QEMU; a leftover process is reaped on the next start
      console.log       the guest's serial console
      qemu.log          QEMU's own stderr
      qemu-vm.json      the accelerator and machine the overlay's snapshots need (:mod:`.vmstate`)

      checkpoints/      one directory per checkpoint of a VM started from a golden checkpoint

The backend is built in layers, one concern to a module: the QEMU process and its QMP and
agent channels (:mod:`.machine`), checkpoints (:mod:`.snapshots`), the ways to power on
(:mod:`.launch`), and here the guest programs, the file copies (:mod:`.copies`,
:mod:`.xfer`), the options and the availability probe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from boincvm import proc
from boincvm.errors import GuestError, HypervisorError, HypervisorUnavailable, VmTimeout
from boincvm.hypervisor.base import Availability, BackendKind, GuestProcess, ProcessStatus, VmSpec
from boincvm.hypervisor.qemu import cmdline as cl
from boincvm.hypervisor.qemu import copies
from boincvm.hypervisor.qemu import xfer as qemu_xfer
from boincvm.hypervisor.qemu.accel import kvm_device
from boincvm.hypervisor.qemu.launch import QemuLaunch
from boincvm.hypervisor.qemu.options import QemuOptions
from boincvm.hypervisor.qemu.runtime import PATH_QEMU, QemuTools

TAIL_BYTES = 64 * 1024


def probe_tools(tools: QemuTools) -> Availability:
    """Whether the QEMU of ``tools`` can run here: bundled, or QEMU and qemu-img on PATH; the
    detail says whether KVM looks usable."""
    kvm = kvm_device()
    if tools.bundled is not None:
        return Availability(True, "QEMU is bundled", kvm or "/dev/kvm is usable (a trial boot decides)")
    for tool in (cl.QEMU, "qemu-img"):
        if proc.which(tool) is None:
            hint = proc.INSTALL_HINTS.get(tool, "")
            return Availability(False, f"{tool} was not found", hint)
    return Availability(True, "QEMU is installed", kvm or "/dev/kvm is usable (a trial boot decides)")


class QemuBackend(QemuLaunch, kind=BackendKind.QEMU):
    """A VM run by ``qemu-system-x86_64`` (KVM when it works, TCG otherwise).

    ``spec.options`` are :class:`~.qemu_options.QemuOptions`: the machine (q35 by default,
    whose PCIe hot-plug of transfer disks costs a quarter of pc's ACPI one), the
    accelerator, golden checkpoints (:mod:`.golden`), the snapshot timeout, the
    transfer disk (:mod:`.xfer`) and the bundled QEMU runtime (:mod:`.runtime`; a logical
    name resolved through ``spec.resolve_file`` when the spec has one).
    After :meth:`power_on`, :attr:`accel` says which accelerator runs the VM and why,
    for the CLI to show.

    Raises (any method): see :class:`~boincvm.hypervisor.base.Backend`.
    """

    #: QEMU's own memory beyond the guest's: its peak RSS under TCG (tb-size 32) was 127.5 MiB
    #: above guest memory at -m 256 and at -m 1024; the rest is the wrapper itself and headroom.
    memory_overhead_mb: ClassVar[int] = 256

    @classmethod
    def check_options(cls, options: Mapping[str, str]) -> None:
        """See :class:`~.qemu_options.QemuOptions`.

        Raises:
            InputError: an unknown option or a value the backend does not accept.
        """
        QemuOptions.from_options(options)

    def __init__(self, spec: VmSpec) -> None:
        """Check the options and find the QEMU to run (unpacking a bundled runtime once per host).

        Raises:
            InputError: an option is malformed, or the runtime's name is not a logical name.
            RuntimeArchiveError: the bundled runtime archive is damaged.
            ToolError: the runtime cannot be unpacked (lock held too long, disk full).
        """
        super().__init__(spec)
        self._transfer = qemu_xfer.TransferDisk(self, qemu_xfer.Settings.from_options(self.opts))

    # -- availability ---------------------------------------------------------
    @classmethod
    def probe(cls) -> Availability:
        """QEMU and qemu-img are installed on PATH; the detail says whether KVM looks usable."""
        return probe_tools(PATH_QEMU)

    def availability(self) -> Availability:
        """Like :meth:`probe`, for the QEMU this VM runs: a bundled one needs none installed."""
        return probe_tools(self.tools)

    # -- guest programs -------------------------------------------------------
    def start_program(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> GuestProcess:
        """Start ``argv`` through ``guest-exec`` (output captured); ``cwd`` goes through ``/bin/sh``.

        Raises:
            GuestError: the agent could not start it.
        """
        if not argv:
            raise GuestError("qemu: an empty command line cannot be started")
        real = list(argv)
        if cwd is not None:
            real = ["/bin/sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd, *argv]
        pid = self._agent_or_fail().exec(real, env)
        return GuestProcess(pid=pid, argv=tuple(argv))

    def poll_program(self, proc_: GuestProcess) -> ProcessStatus:
        """Ask ``guest-exec-status``; the final status is remembered (the agent reports it once).

        Raises:
            GuestError: the agent does not know the program.
        """
        if proc_.pid in self._finished:
            return self._finished[proc_.pid]
        st = self._agent_or_fail().exec_status(proc_.pid)
        if not st.exited:
            return ProcessStatus(running=True)
        done = ProcessStatus(
            running=False,
            exit_code=st.exit_code,
            signal=st.signal,
            stdout_tail=st.stdout[-TAIL_BYTES:],
            stderr_tail=st.stderr[-TAIL_BYTES:],
        )
        self._finished[proc_.pid] = done
        return done

    # -- files ----------------------------------------------------------------
    def copy_to_guest(self, host_path: Path, guest_path: str) -> None:
        """Write a host file into the guest: a large one through a transfer disk, else the agent.

        Files of ``transfer_disk_min_bytes`` (4 MiB) or more go through a hot-plugged disk
        (:mod:`.xfer`) when the machine can hot-plug; smaller ones, and every file
        of a guest that cannot take a disk, through ``guest-file-write`` in 4 MiB chunks.

        Raises:
            GuestError: the guest file cannot be created or written.
            InputError: the host file cannot be read.
            VmTimeout: the transfer disk did not appear, the copy stalled or the unplug hung.
        """
        copies.copy_in(self._agent_or_fail(), self._transfer, host_path, guest_path)

    def copy_from_guest(self, guest_path: str, host_path: Path, *, max_bytes: int | None = None) -> int:
        """Copy a guest file to the host through a temporary file renamed into place.

        The size is checked in the guest first; a large file then goes through a
        transfer disk (see :meth:`copy_to_guest`), a small one through the agent.

        Raises:
            OutputError: the file is missing, larger than ``max_bytes`` or changed size
                meanwhile (then nothing is written at ``host_path``).
            GuestError: reading it failed.
            VmTimeout: the transfer disk did not appear, the copy stalled or the unplug hung.
        """
        return copies.copy_out(self._agent_or_fail(), self._transfer, guest_path, host_path, max_bytes)

    def read_guest_file(self, guest_path: str, *, max_bytes: int = 65536) -> bytes | None:
        """Return up to ``max_bytes`` of a guest file, or None when it does not exist.

        Raises:
            GuestError: it exists but cannot be read.
        """
        return copies.read_small(self._agent_or_fail(), guest_path, max_bytes)

    # -- accounting -----------------------------------------------------------
    def guest_cpu_time(self) -> float | None:
        """Busy CPU seconds of the whole guest from its ``/proc/stat``, or None if unreadable."""
        try:
            data = self.read_guest_file("/proc/stat", max_bytes=65536)
        except (GuestError, VmTimeout, HypervisorError):
            return None
        if not data:
            return None
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("cpu "):
                v = [int(x) for x in line.split()[1:]]
                busy = v[0] + v[1] + v[2] + (v[5] if len(v) > 5 else 0) + (v[6] if len(v) > 6 else 0)
                return busy / 100.0  # USER_HZ is 100 on Linux guests
        return None


def require_qemu() -> None:
    """Raise when QEMU is not installed.

    Raises:
        HypervisorUnavailable: with the reason.
    """
    avail = QemuBackend.probe()
    if not avail.ok:
        raise HypervisorUnavailable(f"qemu: {avail.reason}", hint=avail.detail or None)
