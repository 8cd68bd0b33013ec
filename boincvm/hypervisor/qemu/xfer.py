"""The bulk path for large files: a raw virtio-blk "transfer disk" hot-plugged for one copy.

qemu-guest-agent moves files as base64 in JSON, which qemu-ga parses one character at a
time: about 2 MB/s into the guest and 6-10 MB/s out under TCG. A block device has no
such cost, so a file of :data:`MIN_BYTES` or more goes this way instead:

* host -> guest: the host file itself becomes a read-only raw block node (no copy is
  made; QEMU pads the last partial sector with zeros), a ``virtio-blk-pci`` device with
  a unique serial is hot-plugged, and a guest shell finds it through
  ``/sys/block/vd*/serial``, runs ``dd`` with ``iflag=direct oflag=direct`` (no copy
  through the guest CPU) and truncates the copy to the real size;
* guest -> host: a sparse temporary file rounded up to 4 MiB becomes a writable raw
  node, the guest ``dd``\\ s the file onto the disk (direct I/O both ends, the last block
  padded), and once the device is gone the host truncates the file to the real size.

The device is always unplugged before a copy returns, and the unplug is complete
(the device has left ``/machine/peripheral`` and its block node is deleted): a
checkpoint taken while the guest still held the device would not restore
(reference/qemu_guest_lab.md, pitfall 4). :func:`release_leftovers` runs before every
snapshot for the case where an unplug timed out.

Hot-plug needs ACPI PCI hot-plug (machine ``pc``, or ``q35`` through the root port
:mod:`.cmdline` adds); ``microvm`` has none, and those guests use the agent.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from boincvm.errors import BoincvmError, GuestError, HypervisorError, OutputError, VmTimeout
from boincvm.hypervisor.base import GuestProcess, ProcessStatus, VmSpec, polls
from boincvm.hypervisor.qemu import cmdline as cl
from boincvm.hypervisor.qemu.options import DEFAULT_TRANSFER_MIN_BYTES, QemuOptions

log = logging.getLogger(__name__)


class QemuVm(Protocol):
    """What a transfer disk needs of the QEMU backend that owns it (the backend imports this
    module, not the other way round)."""

    spec: VmSpec
    machine: str
    hotplug_port: bool

    def qmp(
        self, cmd: str, args: Mapping[str, object] | None = None, *, timeout: float | None = None
    ) -> Any: ...

    def start_program(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None
    ) -> GuestProcess: ...

    def poll_program(self, proc: GuestProcess) -> ProcessStatus: ...

    def run_program(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> ProcessStatus: ...


#: Files smaller than this go through the agent: a plug and unplug cost about 0.25-1 s.
MIN_BYTES = DEFAULT_TRANSFER_MIN_BYTES
#: The guest copies in blocks of this size (``bs=4M`` in :data:`GUEST_SCRIPT`); a disk
#: written by the guest is rounded up to it.
BLOCK = 4 * 1024 * 1024
#: Prefix of the device ids, node names and serials (a virtio-blk serial holds 20 bytes).
PREFIX = "bvmx-"
#: Slowest rate a copy may run at before it is declared stuck (bytes per second).
SLOWEST = 1_000_000
PLUG_TIMEOUT = 30.0
UNPLUG_TIMEOUT = 30.0
POLL = 0.05
#: The guest script's end is polled at least this often.
DONE_POLL = 0.02
# Exit codes of the guest script that mean "this guest cannot use a transfer disk":
# the agent path still works there.
NO_DEVICE, NO_TOOLS = 3, 4

#: Run by /bin/sh in the guest: $1 serial, $2 in|out, $3 guest file, $4 size, $5 polls.
#: It prints the size of the guest file it copied (for "out") on stdout.
GUEST_SCRIPT = r"""
serial=$1 dir=$2 file=$3 size=$4 polls=$5
for t in dd truncate stat; do
  command -v "$t" >/dev/null 2>&1 || { echo "the guest has no $t" >&2; exit 4; }
done
dev=
while :; do
  for d in /sys/block/vd*; do
    s=
    # The serial has no newline, so read finds it but reports end of file.
    [ -r "$d/serial" ] && read -r s < "$d/serial"
    [ "$s" = "$serial" ] && [ -b "/dev/${d##*/}" ] && dev="/dev/${d##*/}"
  done
  [ -n "$dev" ] && break
  polls=$((polls - 1))
  [ "$polls" -gt 0 ] || { echo "the transfer disk $serial did not appear in /sys/block" >&2; exit 3; }
  sleep 0.05
done
# O_DIRECT on both ends: the data moves by DMA and the guest CPU copies nothing (under TCG
# that copy is the bottleneck). A file system without O_DIRECT (tmpfs before Linux 6.6)
# takes the page-cache path instead.
if [ "$dir" = in ]; then
  out=$(dd if="$dev" of="$file" bs=4M iflag=direct oflag=direct 2>&1) \
    || out=$(dd if="$dev" of="$file" bs=4M iflag=direct 2>&1) || { echo "$out" >&2; exit 5; }
  truncate -s "$size" -- "$file" || exit 5
else
  out=$(dd if="$file" of="$dev" bs=4M iflag=fullblock,direct conv=sync,notrunc oflag=direct 2>&1) \
    || out=$(dd if="$file" of="$dev" bs=4M iflag=fullblock conv=sync,notrunc oflag=direct 2>&1) \
    || { echo "$out" >&2; exit 5; }
  stat -c %s -- "$file"
fi
"""


def supported(machine: str, hotplug_port: bool) -> bool:
    """True when the VM can hot-plug a PCI disk: ACPI hot-plug on pc, the root port on q35."""
    return machine == "pc" or (machine == "q35" and hotplug_port)


@dataclass(frozen=True)
class Settings:
    """When the transfer disk is used (from the options ``transfer_disk`` and ``transfer_disk_min_bytes``)."""

    enabled: bool
    min_bytes: int = MIN_BYTES

    @classmethod
    def from_options(cls, opts: QemuOptions) -> Settings:
        """The settings the checked options ask for."""
        return cls(enabled=opts.transfer_disk == "auto", min_bytes=opts.transfer_disk_min_bytes)


class TransferDisk:
    """Copies through hot-plugged disks for one :class:`~boincvm.hypervisor.qemu.backend.QemuBackend`.

    After a guest has shown it cannot use one (no hot-plug, no ``dd``), it is not
    tried again for that VM: :meth:`wanted` says False from then on.
    """

    def __init__(self, vm: QemuVm, settings: Settings) -> None:
        self.vm = vm
        self.settings = settings
        self.unusable: str | None = None
        #: Copies that went through a disk (for tests and benchmarks).
        self.copies = 0

    def wanted(self, size: int) -> bool:
        """True when a file of ``size`` bytes should take the transfer disk."""
        return (
            self.settings.enabled
            and self.unusable is None
            and size >= self.settings.min_bytes
            and supported(self.vm.machine, self.vm.hotplug_port)
        )

    # -- the two directions ---------------------------------------------------
    def push(self, host_path: Path, guest_path: str, size: int) -> bool:
        """Copy ``host_path`` (``size`` bytes) to ``guest_path``; False when the guest cannot take a disk.

        Raises:
            GuestError: the guest failed to write the file.
            VmTimeout: the device did not appear, the copy or the unplug took too long.
            HypervisorError: QEMU refused the disk.
        """
        return self._copy("in", host_path.resolve(), guest_path, size, writable=False) is not None

    def pull(self, guest_path: str, tmp: Path, size: int) -> bool:
        """Copy ``guest_path`` (``size`` bytes) into the new file ``tmp``; False when the guest cannot.

        ``tmp`` holds exactly the guest file afterwards; on an error it may hold part
        of it (the caller removes it).

        Raises:
            OutputError: the guest file changed size while it was copied.
            GuestError: the guest failed to read the file.
            VmTimeout: the device did not appear, the copy or the unplug took too long.
        """
        padded = -(-size // BLOCK) * BLOCK
        with tmp.open("xb") as f:
            f.truncate(padded)  # sparse: only what the guest writes takes space
        copied = self._copy("out", tmp.resolve(), guest_path, size, writable=True)
        if copied is None:
            return False
        if copied != size:
            raise OutputError(
                f"guest file {guest_path} changed size while it was copied ({size} -> {copied})"
            )
        with tmp.open("r+b") as f:
            f.truncate(size)
        return True

    # -- one plugged copy -----------------------------------------------------
    def _copy(
        self, direction: str, host_file: Path, guest_path: str, size: int, *, writable: bool
    ) -> int | None:
        vm = self.vm
        release_leftovers(vm)
        name = f"{PREFIX}{uuid.uuid4().hex[:12]}"
        # The guest's side starts first and waits for the disk: its shell starts while
        # the disk is plugged (each takes 30-100 ms under TCG).
        started = self._start_guest(name, direction, guest_path, size)
        try:
            self._plug(name, host_file, writable=writable)
        except BoincvmError:
            self._kill_guest(started)
            raise
        try:
            try:
                result = self._wait_guest(started, guest_path, size)
            finally:
                _unplug(vm, name)
        finally:
            _blockdev_del(vm, name)
        code, stdout, stderr = result
        if code in (NO_DEVICE, NO_TOOLS):
            self.unusable = stderr.strip() or f"exit code {code}"
            log.warning("qemu: %s cannot use a transfer disk (%s); using the guest agent", vm.spec.name,
                        self.unusable)  # fmt: skip
            return None
        if code != 0:
            what = "writing" if direction == "in" else "reading"
            raise GuestError(f"guest: {what} {guest_path} through the transfer disk failed: {stderr.strip()}")
        self.copies += 1
        if direction == "in":
            return size
        try:
            return int(stdout.split()[-1])
        except (ValueError, IndexError):
            raise GuestError(f"guest: the transfer disk copy of {guest_path} said {stdout!r}") from None

    def _plug(self, name: str, host_file: Path, *, writable: bool) -> None:
        """Add ``host_file`` as raw block node ``name`` and hot-plug a disk on it (serial ``name``)."""
        vm = self.vm
        node: dict[str, object] = {"driver": "file", "filename": str(host_file)}
        if writable:
            # A temporary file renamed into place: a host fsync would only cost time.
            node["cache"] = {"no-flush": True}
        vm.qmp("blockdev-add", {"driver": "raw", "node-name": name, "read-only": not writable,
                                "file": {**node, "read-only": not writable}})  # fmt: skip
        device: dict[str, object] = {"driver": "virtio-blk-pci", "id": name, "drive": name, "serial": name}
        if vm.machine == "q35":
            device["bus"] = cl.HOTPLUG_PORT
        try:
            vm.qmp("device_add", device)
        except BoincvmError:
            _blockdev_del(vm, name)
            raise

    def _start_guest(self, serial: str, direction: str, guest_path: str, size: int) -> GuestProcess:
        tries = int(PLUG_TIMEOUT / POLL)
        argv = [
            "/bin/sh",
            "-c",
            GUEST_SCRIPT,
            "boincvm-xfer",
            serial,
            direction,
            guest_path,
            str(size),
            str(tries),
        ]
        return self.vm.start_program(argv)

    def _wait_guest(self, started: GuestProcess, guest_path: str, size: int) -> tuple[int, str, str]:
        """The guest script's exit code, stdout and stderr; polled finely (an agent call costs
        the guest no process), so its end is seen within :data:`DONE_POLL`."""
        timeout = PLUG_TIMEOUT + 30.0 + size / SLOWEST
        for _ in polls(timeout, 0.005, max_interval=DONE_POLL):
            st = self.vm.poll_program(started)
            if not st.running:
                return (
                    st.exit_code if st.exit_code is not None else -(st.signal or 1),
                    st.stdout_tail.decode(errors="replace"),
                    st.stderr_tail.decode(errors="replace"),
                )
        # Stop the copy so the guest lets go of the device before it is unplugged.
        self._kill_guest(started)
        raise VmTimeout(f"qemu: copying {guest_path} through the transfer disk took over {timeout:g} s")

    def _kill_guest(self, started: GuestProcess) -> None:
        try:
            self.vm.run_program(["kill", "-9", str(started.pid)], timeout=10)
        except (GuestError, VmTimeout) as exc:
            log.debug("killing the guest's side of a copy: %s", exc)


def _peripherals(vm: QemuVm) -> list[str]:
    return [str(p["name"]) for p in vm.qmp("qom-list", {"path": "/machine/peripheral"})]


def _unplug(vm: QemuVm, name: str) -> None:
    """Unplug device ``name`` and wait until the guest has released it (bounded).

    Raises:
        VmTimeout: the guest did not release it within :data:`UNPLUG_TIMEOUT`.
    """
    if name not in _peripherals(vm):
        return
    try:
        vm.qmp("device_del", {"id": name})
    except HypervisorError as exc:
        if "is already in the process of unplug" not in str(exc):
            raise
    for _ in polls(UNPLUG_TIMEOUT, 0.01):
        if name not in _peripherals(vm):
            return
    raise VmTimeout(
        f"qemu: the guest did not release the transfer disk {name} within {UNPLUG_TIMEOUT:g} s",
        hint="snapshots of this VM are refused while the disk is attached; power it off",
    )


def _blockdev_del(vm: QemuVm, name: str) -> None:
    """Delete block node ``name``; the device lets go of it shortly after it leaves the tree.

    Raises:
        VmTimeout: the node stayed in use.
    """
    in_use: HypervisorError | None = None
    for _ in polls(UNPLUG_TIMEOUT, 0.01):
        try:
            vm.qmp("blockdev-del", {"node-name": name})
            return
        except HypervisorError as exc:
            text = str(exc)
            if "Failed to find node" in text or "Cannot find node" in text:
                return
            if "is in use" not in text:
                raise
            in_use = exc
    assert in_use is not None
    raise in_use


def release_leftovers(vm: QemuVm) -> None:
    """Unplug and delete any transfer disk an earlier copy left (one whose unplug timed out).

    Raises:
        VmTimeout: a leftover disk is still held by the guest.
    """
    for name in _peripherals(vm):
        if name.startswith(PREFIX):
            log.info("qemu: unplugging a leftover transfer disk %s", name)
            _unplug(vm, name)
    for node in vm.qmp("query-named-block-nodes", {"flat": True}):
        name = str(node.get("node-name", ""))
        if name.startswith(PREFIX):
            _blockdev_del(vm, name)
