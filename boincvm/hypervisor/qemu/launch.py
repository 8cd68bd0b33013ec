"""Powering a QEMU VM on: the accelerator, the overlay, and the three ways to start.

A fresh start chooses the accelerator (:mod:`.accel`), makes a new overlay and records
what its snapshots will need (:mod:`.vmstate`), then starts from the image's golden
checkpoint (:mod:`.golden`, built on first use) or boots cold. A restore reads that record
back and starts from a checkpoint: a RAM diff against the golden RAM (:mod:`.ramdiff`) or
an internal snapshot of the overlay (``-loadvm``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from boincvm import proc
from boincvm.errors import GuestError, HypervisorError, VmTimeout
from boincvm.hypervisor.base import Availability, VmSpec, polls
from boincvm.hypervisor.qemu import cmdline as cl
from boincvm.hypervisor.qemu import golden as qemu_golden
from boincvm.hypervisor.qemu import ramdiff
from boincvm.hypervisor.qemu.accel import AccelChoice, choose_accel, qemu_identity
from boincvm.hypervisor.qemu.machine import OVERLAY
from boincvm.hypervisor.qemu.snapshots import QemuSnapshots
from boincvm.hypervisor.qemu.vmstate import VmState

log = logging.getLogger(__name__)

#: Migration leaves out RAM mapped shared (the golden RAM file): see :mod:`.golden`.
IGNORE_SHARED = {"capability": "x-ignore-shared", "state": True}


@dataclass(frozen=True)
class _Start:
    """How the next QEMU starts: the overlay a guest disk or not, the RAM file to map
    (None: plain RAM), and the RAM-diff checkpoint to restore (None: not one)."""

    attach_disk: bool
    ram_file: Path | None
    diff: Path | None = None


class QemuLaunch(QemuSnapshots):
    """The power-on layer of :class:`~boincvm.hypervisor.qemu.backend.QemuBackend`."""

    def __init__(self, spec: VmSpec) -> None:
        super().__init__(spec)
        self._accel_checked: AccelChoice | None = None  # check_accel's verdict, for the next power-on
        self._cold_only = False  # set when this VM's golden checkpoint failed to load
        #: Set by the golden build: this VM's RAM goes into that file, mapped shared.
        self.golden_ram_out: Path | None = None

    # -- the accelerator ------------------------------------------------------
    @property
    def accel_name(self) -> str:
        """``kvm`` or ``tcg`` once the VM was started, else ""."""
        return self.accel.accel if self.accel is not None else ""

    @property
    def accel_note(self) -> str | None:
        """A sentence for the user when the VM runs without KVM, else None."""
        if self.accel is None or self.accel.is_kvm:
            return None
        return self.accel.note

    def check_accel(self) -> Availability:
        """Probe KVM now (the device, then a bounded, cached trial boot); power-on reuses the verdict."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._accel_checked = self._choose_accel()
        choice = self._accel_checked
        # TCG forced by configuration is reported too: a job that requires KVM must not run on it.
        return Availability(choice.is_kvm, choice.reason, choice.hint)

    def _choose_accel(self) -> AccelChoice:
        return choose_accel(self.spec.kernel, self.workdir, self.opts.accel, self.tools)

    # -- power on -------------------------------------------------------------
    def power_on(self, *, snapshot: str | None = None) -> None:
        """Start the VM fresh (new overlay) or from ``snapshot`` in the existing overlay.

        A fresh start returns once QEMU runs (call :meth:`wait_for_tools`); a restore
        returns once the guest agent answers again and the guest clock is set.

        Raises:
            HypervisorError: QEMU failed to start, the base image or the snapshot is missing.
            GuestToolsMissing: after a restore, the agent did not answer.
        """
        self._start_t0 = time.monotonic()
        self.start_timings = {}
        self._power_on(snapshot)

    def _power_on(self, snapshot: str | None) -> None:
        if self.is_running():
            raise HypervisorError(f"qemu: VM {self.spec.name} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        self._reap_stale()
        self._finished.clear()
        golden: qemu_golden.Golden | None = None
        if snapshot is None:
            golden, start = self._fresh_start()
        else:
            start = self._restore_start(snapshot)
        args = self._qemu_args(start, snapshot, golden)
        self._ram_private = args.ram_file if args.ram_file is not None and not args.ram_shared else None
        if self._ram_private is not None:  # keeps the golden checkpoint from being pruned
            qemu_golden.mark_used(self._ram_private)
        self._diff_restored = False
        if start.diff is not None:
            self._restore_diff(args, start.diff)
        elif golden is None:
            self._start_plain(args, snapshot)
        else:
            self._start_golden_or_cold(args, golden)

    def _fresh_start(self) -> tuple[qemu_golden.Golden | None, _Start]:
        """Choose the accelerator and the golden checkpoint, make a new overlay and record the state."""
        self.accel = self._accel_checked or self._choose_accel()
        golden = self._golden()
        attach = self._create_overlay(golden)
        # A new overlay: checkpoints of an earlier VM in this directory applied to the old one.
        shutil.rmtree(self._path(ramdiff.CHECKPOINTS), ignore_errors=True)
        self.hotplug_port = self.machine == "q35"
        saved_ram = golden.ram if golden is not None else None
        VmState(self.accel.accel, self.machine, attach, self.hotplug_port, saved_ram).save(self.workdir)
        return golden, _Start(attach, saved_ram if saved_ram is not None else self.golden_ram_out)

    def _restore_start(self, snapshot: str) -> _Start:
        """Take the accelerator and machine the snapshot was taken with; check it is there.

        Raises:
            HypervisorError: the state file or the snapshot is missing, or a RAM diff is damaged.
        """
        state = VmState.load(self.workdir)
        self.accel = AccelChoice(state.accel, f"restored with {state.accel}, as the snapshot was taken")
        self.machine = state.machine
        self.hotplug_port = state.hotplug_port
        names = [s.name for s in self._offline_snapshots()]
        if snapshot not in names:
            have = ", ".join(names) or "none"
            raise HypervisorError(f"qemu: no snapshot {snapshot!r} in {self._path(OVERLAY)} (has: {have})")
        diff = ramdiff.checkpoint_dir(self.workdir, snapshot)
        if ramdiff.is_complete(diff):
            return _Start(state.attach_disk, self._prepare_diff_restore(snapshot, diff), diff)
        # The snapshot holds all of RAM; mapping the golden RAM under it again keeps the
        # pages the guest has not written since shared. Gone (cache cleared): plain RAM,
        # which takes the same snapshot (the backend has the same id).
        ram = state.ram_file if state.ram_file is not None and state.ram_file.is_file() else None
        return _Start(state.attach_disk, ram)

    def _qemu_args(
        self, start: _Start, snapshot: str | None, golden: qemu_golden.Golden | None
    ) -> cl.QemuArgs:
        assert self.accel is not None
        tsc = None
        if self.machine == "microvm" or self.accel.accel == "tcg":
            # microvm cannot calibrate the TSC without it; under TCG on pc and q35 the
            # calibration against the PIT fails and the HPET fallback costs about 0.6 s.
            with contextlib.suppress(OSError):
                tsc = cl.host_tsc_khz(Path("/proc/cpuinfo").read_text())
        return cl.QemuArgs(
            name=self.spec.name,
            accel=self.accel.accel,
            machine=self.machine,
            memory_mb=self.spec.memory_mb,
            ncpus=self.spec.ncpus,
            disk=Path(OVERLAY),
            attach_disk=start.attach_disk,
            kernel=self.spec.kernel.resolve() if self.spec.kernel else None,
            initrd=self.spec.initrd.resolve() if self.spec.initrd else None,
            cmdline=self.spec.kernel_cmdline,
            network=self.spec.enable_network,
            loadvm=snapshot,
            tsc_khz=tsc,
            hotplug_port=self.hotplug_port,
            ram_file=start.ram_file,
            ram_shared=golden is None and snapshot is None and start.ram_file is not None,
        )

    # -- the overlay ----------------------------------------------------------
    def _base_format(self, image: Path) -> str:
        argv: list[str | Path] = [*self.tools.img_command(), "info", "-U", "--output=json", image]
        return str(json.loads(proc.run(argv, timeout=60).text)["format"])

    def _create_overlay(self, golden: qemu_golden.Golden | None) -> bool:
        """Make a fresh overlay; True when it is a disk the guest sees."""
        img = self.tools.img_command()
        overlay = self._path(OVERLAY)
        overlay.unlink(missing_ok=True)
        if golden is not None:
            proc.run([*img, "create", "-q", "-f", "qcow2", "-b", golden.disk, "-F", "qcow2", overlay],
                     timeout=60)  # fmt: skip
            return self.spec.image is not None
        if self.spec.image is not None:
            base = self.spec.image.resolve()
            if not base.is_file():
                raise HypervisorError(f"qemu: base image {base} does not exist")
            fmt = self._base_format(base)
            proc.run([*img, "create", "-q", "-f", "qcow2", "-b", base, "-F", fmt, overlay], timeout=60)
            return True
        # No disk: a detached qcow2 only to hold snapshot state.
        proc.run([*img, "create", "-q", "-f", "qcow2", overlay, "64M"], timeout=60)
        return False

    # -- the three ways to start ----------------------------------------------
    def _start_plain(self, args: cl.QemuArgs, snapshot: str | None) -> None:
        """Boot cold, or restore an internal snapshot of the overlay (``-loadvm``)."""
        self._spawn(args)
        if snapshot is not None:  # -loadvm restored it before QEMU's main loop started
            self._ensure_running()
            self._after_restore()

    def _start_golden_or_cold(self, args: cl.QemuArgs, golden: qemu_golden.Golden) -> None:
        try:
            self._start_from_golden(args, golden)
        except (HypervisorError, GuestError) as exc:
            # A golden checkpoint is only a speed-up: boot cold instead, and set the golden
            # checkpoint aside once QEMU has started without it (else it was not the cause).
            log.warning("the golden checkpoint of %s did not load (%s); booting cold", self.spec.name, exc)
            self.power_off(soft_timeout=0)
            self._cold_only = True
            self._power_on(None)
            qemu_golden.mark_broken(golden, str(exc))

    def _start_from_golden(self, args: cl.QemuArgs, golden: qemu_golden.Golden) -> None:
        # The state is read straight from an inherited descriptor: no shell, no cat, no pipe.
        # It holds no RAM (x-ignore-shared at the save): the RAM is golden.ram, mapped privately.
        fd = os.open(golden.state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._spawn(dataclasses.replace(args, incoming="defer"), pass_fds=(fd,))
        finally:
            os.close(fd)  # QEMU holds its own copy, under the same number
        self.qmp("migrate-set-capabilities", {"capabilities": [IGNORE_SHARED]})
        self.qmp("migrate-incoming", {"uri": f"fd:{fd}"})
        self._wait_incoming("the golden checkpoint")
        # Off again: a snapshot records the capability and would then only load with it on.
        self.qmp("migrate-set-capabilities", {"capabilities": [{**IGNORE_SHARED, "state": False}]})
        self._ensure_running()
        self._after_restore()

    # -- golden checkpoints ---------------------------------------------------
    def _golden(self) -> qemu_golden.Golden | None:
        """The golden checkpoint to start from (built on first use), or None for a cold boot."""
        wanted = self.opts.golden
        if wanted == "no" or (wanted == "auto" and self.spec.kernel is None) or self.accel is None:
            return None
        if self._cold_only:
            return None
        key = qemu_golden.golden_key(self.spec, self.accel.accel, self.machine, qemu_identity(self.tools))
        found = qemu_golden.find(key)
        if found is not None:
            return found
        if qemu_golden.is_broken(key):
            log.info("the golden checkpoint %s failed to load before; booting cold", key)
            return None
        try:
            img = self.tools.img_command()
            return qemu_golden.build(self.spec, key, self.accel.accel, self._save_golden, img)
        except (HypervisorError, GuestError) as exc:
            # Only a speed-up: a cold boot still works, and wait_for_tools reports real trouble.
            log.warning("no golden checkpoint for %s (%s); booting cold", self.spec.name, exc)
            return None

    def _save_golden(self, boot: VmSpec, state: Path, ram: Path, scratch: bool) -> None:
        """Boot ``boot`` with its RAM mapped shared from ``ram`` (unlinked once QEMU has it
        open when ``scratch``), wait for its agent, stop it and migrate its state into ``state``.

        The state goes out through a descriptor handed to QEMU over QMP (``getfd``), the way
        :meth:`_start_from_golden` reads it back through an inherited one: no shell, no
        ``cat``, no pipe.

        Raises:
            HypervisorError: the boot or the migration failed.
            GuestToolsMissing: the guest agent never answered.
            VmTimeout: the migration did not finish within 120 s.
        """
        with type(self)(boot) as vm:
            vm.golden_ram_out = ram
            vm.power_on()
            if scratch:  # QEMU has it mapped, the builder has a descriptor: the name can go
                ram.unlink(missing_ok=True)
            vm.wait_for_tools()
            vm.qmp("stop")
            # The RAM is in golden.ram already (mapped shared): the stream carries the devices.
            vm.qmp("migrate-set-capabilities", {"capabilities": [IGNORE_SHARED]})
            vm.qmp("migrate-set-parameters", {"max-bandwidth": 16 * 1024**3})
            vm.send_fd("golden-state", state)
            vm.qmp("migrate", {"uri": "fd:golden-state"})
            for _ in polls(120, 0.01):
                status = vm.qmp("query-migrate").get("status")
                if status in ("completed", "failed", "cancelled"):
                    break
            else:
                raise VmTimeout("saving the golden checkpoint did not finish within 120 s")
            if status != "completed":
                raise HypervisorError(f"qemu: saving the golden checkpoint {status}")
