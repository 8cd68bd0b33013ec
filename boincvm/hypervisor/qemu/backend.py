"""The QEMU backend: QMP for the machine, qemu-guest-agent for the guest.

One :class:`QemuBackend` drives one VM in one slot work directory::

    workdir/            mode 0700
      disk.qcow2        the copy-on-write overlay on the read-only base (holds snapshots)
      qmp.sock qga.sock the control and agent channels
      qemu.pid          written by QEMU; a leftover process is reaped on the next start
      console.log       the guest's serial console
      qemu.log          QEMU's own stderr
      qemu-vm.json      the accelerator and machine the overlay's snapshots need

      checkpoints/      one directory per checkpoint of a VM started from a golden checkpoint

A VM started from a golden checkpoint checkpoints what its guest wrote (:mod:`.ramdiff`):
the pages of RAM it owns, the device state and a qcow2 internal snapshot of the disk,
the VM paused for about 0.05 s. Other VMs (booted cold, or where the host does not let
this process read QEMU's memory) take qcow2 internal snapshots through QMP
``snapshot-save`` jobs (memory and disk in one file, the VM paused for about 0.1-0.3 s).
Either is complete before it is listed: qcow2 writes a snapshot's data before it links
it into the snapshot table, and a checkpoint directory is renamed into place once its
files are on disk, so a QEMU killed half way through leaves the earlier checkpoints
loadable (tested in ``tests/integration``).

QEMU cannot outlive its owner: it is started through ``setpriv --pdeathsig KILL`` from a
thread that lives as long as the process, an ``atexit`` hook kills what is left, and
the pidfile is reaped when the slot starts again.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from boincvm import proc
from boincvm.errors import (
    GuestError,
    HypervisorError,
    HypervisorUnavailable,
    InputError,
    OutputError,
    OutputMissing,
    VmTimeout,
)
from boincvm.hashing import sha256_file
from boincvm.hypervisor.base import (
    Availability,
    Backend,
    BackendKind,
    GuestProcess,
    ProcessStatus,
    SnapshotInfo,
    VmSpec,
)
from boincvm.hypervisor.qemu import cmdline as cl
from boincvm.hypervisor.qemu import golden as qemu_golden
from boincvm.hypervisor.qemu import ramdiff
from boincvm.hypervisor.qemu import runtime as qemu_rt
from boincvm.hypervisor.qemu import xfer as qemu_xfer
from boincvm.hypervisor.qemu.accel import AccelChoice, choose_accel, kvm_device, qemu_identity
from boincvm.hypervisor.qemu.aio import shared_loop
from boincvm.hypervisor.qemu.options import QemuOptions
from boincvm.hypervisor.qemu.qga import CHUNK, GuestAgent, connect_unix, is_missing_file

log = logging.getLogger(__name__)

OVERLAY = "disk.qcow2"
STATE = "qemu-vm.json"
QEMU_LOG = "qemu.log"
TAIL_BYTES = 64 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
QMP_CLIENT_NAME = "boincvm-qmp"
#: Migration leaves out RAM mapped shared (the golden RAM file): see :mod:`.golden`.
IGNORE_SHARED = {"capability": "x-ignore-shared", "state": True}
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


def _img() -> list[str]:
    """argv prefix for qemu-img: the bundled one when the job named a runtime, else PATH's."""
    return qemu_rt.qemu_img_command()


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_bytes()[-8192:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


class QemuBackend(Backend, kind=BackendKind.QEMU):
    """A VM run by ``qemu-system-x86_64`` (KVM when it works, TCG otherwise).

    ``spec.options`` are :class:`~.qemu_options.QemuOptions`: the machine (q35 by default,
    whose PCIe hot-plug of transfer disks costs a quarter of pc's ACPI one), the
    accelerator, golden checkpoints (:mod:`.golden`), the snapshot timeout and the
    transfer disk (:mod:`.xfer`).
    After :meth:`power_on`, :attr:`accel` says which accelerator runs the VM and why,
    for the CLI to show.

    Raises (any method): see :class:`~boincvm.hypervisor.base.Backend`.
    """

    call_timeout: ClassVar[float] = 60.0
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
        super().__init__(spec)
        self.workdir = spec.workdir
        self.opts = QemuOptions.from_options(spec.options)
        if self.opts.runtime:
            # Unpacked once per host beside the archive; every QEMU of this process uses it.
            qemu_rt.select(qemu_rt.unpack_once(Path(self.opts.runtime)))
        self.machine = self.opts.machine
        # q35 VMs started by this version carry a root port for transfer disks.
        self.hotplug_port = self.machine == "q35"
        self._transfer = qemu_xfer.TransferDisk(self, qemu_xfer.Settings.from_options(self.opts))
        self.accel: AccelChoice | None = None
        self._accel_checked: AccelChoice | None = None  # check_accel's verdict, for the next power-on
        self._cold_only = False  # set when this VM's golden checkpoint failed to load
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
        #: Set by the golden build: this VM's RAM goes into that file, mapped shared.
        self.golden_ram_out: Path | None = None
        #: The golden RAM the running QEMU maps privately (its checkpoints are diffs against it).
        self._ram_private: Path | None = None
        #: The running QEMU was restored from a RAM diff: its streams lack the configuration
        #: section, so it can take no other kind of snapshot.
        self._diff_restored = False
        #: Why this host does not let us read QEMU's memory (then snapshot-save is used).
        self._diff_refused: str | None = None

    # -- availability ---------------------------------------------------------
    @classmethod
    def probe(cls) -> Availability:
        """QEMU and qemu-img are installed (or bundled: a job named a runtime); the detail says
        whether KVM looks usable."""
        kvm = kvm_device()
        if qemu_rt.selected() is not None:
            return Availability(True, "QEMU is bundled", kvm or "/dev/kvm is usable (a trial boot decides)")
        for tool in (cl.QEMU, "qemu-img"):
            if proc.which(tool) is None:
                hint = proc.INSTALL_HINTS.get(tool, "")
                return Availability(False, f"{tool} was not found", hint)
        return Availability(True, "QEMU is installed", kvm or "/dev/kvm is usable (a trial boot decides)")

    # -- helpers --------------------------------------------------------------
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
        self._accel_checked = choose_accel(self.spec.kernel, self.workdir, self.opts.accel)
        choice = self._accel_checked
        # TCG forced by configuration is reported too: a job that requires KVM must not run on it.
        return Availability(choice.is_kvm, choice.reason, choice.hint)

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
        try:
            same_dir = Path(f"/proc/{pid}/cwd").resolve() == self.workdir.resolve()
            is_qemu = (
                "qemu" in Path(f"/proc/{pid}/comm").read_text()
                or b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes()
            )
        except OSError:
            same_dir = is_qemu = False
        if same_dir and is_qemu:
            log.info("killing leftover QEMU %d of %s", pid, self.spec.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        pidfile.unlink(missing_ok=True)

    def _base_format(self, image: Path) -> str:
        info = json.loads(proc.run([*_img(), "info", "-U", "--output=json", image], timeout=60).text)
        return str(info["format"])

    def _create_overlay(self, golden: qemu_golden.Golden | None) -> bool:
        """Make a fresh overlay; True when it is a disk the guest sees."""
        overlay = self._path(OVERLAY)
        overlay.unlink(missing_ok=True)
        if golden is not None:
            proc.run([*_img(), "create", "-q", "-f", "qcow2", "-b", golden.disk, "-F", "qcow2", overlay],
                     timeout=60)  # fmt: skip
            return self.spec.image is not None
        if self.spec.image is not None:
            base = self.spec.image.resolve()
            if not base.is_file():
                raise HypervisorError(f"qemu: base image {base} does not exist")
            fmt = self._base_format(base)
            proc.run([*_img(), "create", "-q", "-f", "qcow2", "-b", base, "-F", fmt, overlay], timeout=60)
            return True
        # No disk: a detached qcow2 only to hold snapshot state.
        proc.run([*_img(), "create", "-q", "-f", "qcow2", overlay, "64M"], timeout=60)
        return False

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self._path(STATE + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self._path(STATE))

    def _load_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self._path(STATE).read_text())
        except (OSError, ValueError) as exc:
            raise HypervisorError(
                f"qemu: {self._path(STATE)} is missing or unreadable, so its snapshots cannot be resumed"
            ) from exc
        if not isinstance(data, dict):
            raise HypervisorError(f"qemu: {self._path(STATE)} is not a JSON object")
        return data

    def _spawn(self, args: cl.QemuArgs, pass_fds: Sequence[int] = ()) -> None:
        # The bundled QEMU (through its loader, with its firmware) when the job named one.
        argv: list[str] = [*qemu_rt.qemu_command(), *cl.build_argv(args)[1:]]
        setpriv = proc.which("setpriv")
        if setpriv is not None:
            argv = [str(setpriv), "--pdeathsig", "KILL", *argv]
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
                env=qemu_rt.qemu_env(),
            )
        )
        with _live_lock:
            _live.add(popen)
        self._popen = popen
        deadline = time.monotonic() + 30
        while True:
            self._check_alive()
            try:
                self._qmp_client = self._loop.run(self._qmp_connect(), 5.0, "connecting to QMP")
                break
            except (QMPError, OSError) as exc:
                if time.monotonic() > deadline:
                    self.power_off(soft_timeout=0)
                    raise HypervisorError(f"qemu: QMP did not come up within 30 s: {exc}") from exc
                time.sleep(0.02)
        self._agent = GuestAgent(self._path(cl.QGA_SOCKET), self._loop, call_timeout=self.call_timeout)
        self.start_timings["qemu"] = time.monotonic() - self._start_t0

    # -- power ----------------------------------------------------------------
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
        diff: Path | None = None  # the RAM-diff checkpoint to restore, if it is one
        if snapshot is None:
            self.accel = self._accel_checked or choose_accel(self.spec.kernel, self.workdir, self.opts.accel)
            golden = self._golden()
            attach = self._create_overlay(golden)
            # A new overlay: checkpoints of an earlier VM in this directory applied to the old one.
            shutil.rmtree(self._path(ramdiff.CHECKPOINTS), ignore_errors=True)
            self.hotplug_port = self.machine == "q35"
            ram_file = golden.ram if golden is not None else self.golden_ram_out
            self._save_state({"accel": self.accel.accel, "machine": self.machine, "attach_disk": attach,
                              "hotplug_port": self.hotplug_port,
                              "ram_file": str(golden.ram) if golden is not None else None})  # fmt: skip
        else:
            golden = None
            state = self._load_state()
            accel = str(state["accel"])
            self.accel = AccelChoice(accel, f"restored with {accel}, as the snapshot was taken")
            self.machine = str(state["machine"])
            attach = bool(state["attach_disk"])
            self.hotplug_port = bool(state.get("hotplug_port", False))  # older states have none
            # The snapshot holds all of RAM; mapping the golden RAM under it again keeps the
            # pages the guest has not written since shared. Gone (cache cleared): plain RAM,
            # which takes the same snapshot (the backend has the same id).
            saved_ram = state.get("ram_file")
            ram_file = Path(saved_ram) if saved_ram and Path(saved_ram).is_file() else None
            names = [s.name for s in self._offline_snapshots()]
            if snapshot not in names:
                have = ", ".join(names) or "none"
                raise HypervisorError(
                    f"qemu: no snapshot {snapshot!r} in {self._path(OVERLAY)} (has: {have})"
                )
            candidate = ramdiff.checkpoint_dir(self.workdir, snapshot)
            if ramdiff.is_complete(candidate):
                diff = candidate
                ram_file = self._prepare_diff_restore(snapshot, diff)
        tsc = None
        if self.machine == "microvm" or self.accel.accel == "tcg":
            # microvm cannot calibrate the TSC without it; under TCG on pc and q35 the
            # calibration against the PIT fails and the HPET fallback costs about 0.6 s.
            with contextlib.suppress(OSError):
                tsc = cl.host_tsc_khz(Path("/proc/cpuinfo").read_text())
        args = cl.QemuArgs(
            name=self.spec.name,
            accel=self.accel.accel,
            machine=self.machine,
            memory_mb=self.spec.memory_mb,
            ncpus=self.spec.ncpus,
            disk=Path(OVERLAY),
            attach_disk=attach,
            kernel=self.spec.kernel.resolve() if self.spec.kernel else None,
            initrd=self.spec.initrd.resolve() if self.spec.initrd else None,
            cmdline=self.spec.kernel_cmdline,
            network=self.spec.enable_network,
            loadvm=snapshot,
            tsc_khz=tsc,
            hotplug_port=self.hotplug_port,
            ram_file=ram_file,
            ram_shared=golden is None and snapshot is None and ram_file is not None,
        )
        self._ram_private = ram_file if ram_file is not None and not args.ram_shared else None
        if self._ram_private is not None:  # keeps the golden checkpoint from being pruned
            qemu_golden.mark_used(self._ram_private)
        self._diff_restored = False
        if diff is not None:
            self._restore_diff(args, diff)
            return
        if golden is None:
            self._spawn(args)
            if snapshot is not None:  # -loadvm restored it before QEMU's main loop started
                self._ensure_running()
                self._after_restore()
            return
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

    def _golden(self) -> qemu_golden.Golden | None:
        """The golden checkpoint to start from (built on first use), or None for a cold boot."""
        wanted = self.opts.golden
        if wanted == "no" or (wanted == "auto" and self.spec.kernel is None) or self.accel is None:
            return None
        if self._cold_only:
            return None
        key = qemu_golden.golden_key(self.spec, self.accel.accel, self.machine, qemu_identity())
        found = qemu_golden.find(key)
        if found is not None:
            return found
        if qemu_golden.is_broken(key):
            log.info("the golden checkpoint %s failed to load before; booting cold", key)
            return None
        try:
            return qemu_golden.build(self.spec, key, self.accel.accel, _save_golden)
        except (HypervisorError, GuestError) as exc:
            # Only a speed-up: a cold boot still works, and wait_for_tools reports real trouble.
            log.warning("no golden checkpoint for %s (%s); booting cold", self.spec.name, exc)
            return None

    def _prepare_diff_restore(self, name: str, diff: Path) -> Path:
        """Check checkpoint ``diff`` whole and its golden RAM there, put the disk back to
        its snapshot; the golden RAM to map.

        Raises:
            HypervisorError: damaged, the golden RAM gone or of another size, or qemu-img failed.
        """
        manifest = ramdiff.read_manifest(diff, verify=True)
        ram = manifest.golden_ram
        want = self._ram_bytes
        if manifest.ram_bytes != want:
            raise HypervisorError(
                f"qemu: checkpoint {name} holds {manifest.ram_bytes} bytes of RAM, the VM has {want}"
            )
        try:
            size = ram.stat().st_size
        except OSError as exc:
            raise HypervisorError(
                f"qemu: checkpoint {name} applies to the golden RAM {ram}, which is gone ({exc.strerror})",
                hint="the boincvm cache was cleared while the task had a checkpoint; the task starts again",
            ) from exc
        if size != want:
            raise HypervisorError(
                f"qemu: the golden RAM {ram} of checkpoint {name} has {size} bytes, not {want}"
            )
        proc.run([*_img(), "snapshot", "-a", name, self._path(OVERLAY)], timeout=120)
        return ram

    def _restore_diff(self, args: cl.QemuArgs, diff: Path) -> None:
        """Start QEMU on the golden RAM, write the checkpoint's pages into it, load its devices."""
        fd = os.open(diff / ramdiff.DEVICES_FILE, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._spawn(
                dataclasses.replace(args, incoming="defer", loadvm=None, devices_only=True), pass_fds=(fd,)
            )
        finally:
            os.close(fd)  # QEMU holds its own copy, under the same number
        assert self._popen is not None and args.ram_file is not None
        self._diff_restored = True
        ramdiff.load_ram(self._popen.pid, args.ram_file, diff / ramdiff.RAM_FILE, self._ram_bytes)
        self.qmp("migrate-incoming", {"uri": f"fd:{fd}"})
        self._wait_incoming(f"checkpoint {diff.name}")
        self._ensure_running()
        self._after_restore()

    def _wait_incoming(self, what: str) -> None:
        deadline = time.monotonic() + 60
        while self.qmp("query-status").get("status") == "inmigrate":
            if time.monotonic() > deadline:
                raise VmTimeout(f"qemu: loading {what} of {self.spec.name} took over 60 s")
            time.sleep(0.005)
        status = self.qmp("query-migrate").get("status")
        if status not in (None, "completed"):
            raise HypervisorError(f"qemu: loading {what} failed ({status})")

    def _after_restore(self) -> None:
        agent = self._agent_or_fail()
        agent.resync(min(self.spec.boot_timeout, 60.0))
        self.start_timings["agent"] = time.monotonic() - self._start_t0
        agent.set_time()
        self.start_timings["ready"] = time.monotonic() - self._start_t0

    def _ensure_running(self) -> None:
        if not self.qmp("query-status").get("running"):
            self.qmp("cont")

    def wait_for_tools(self, timeout: float | None = None) -> None:
        """Block until qemu-ga answers ``guest-sync`` (bounded).

        Raises:
            GuestToolsMissing: no answer within the timeout.
            HypervisorError: QEMU exited meanwhile.
        """
        self._agent_or_fail().wait(self.spec.boot_timeout if timeout is None else timeout, self._check_alive)
        if "agent" not in self.start_timings:  # the first answer after a cold boot
            self.start_timings["agent"] = self.start_timings["ready"] = time.monotonic() - self._start_t0

    def power_off(self, *, soft_timeout: float = 10.0) -> None:
        """Quit QEMU through QMP, then SIGKILL it if it has not gone within ``soft_timeout``. Idempotent.

        The guest is not asked to shut down: its disk is the throw-away overlay, and QEMU
        flushes the overlay itself when it quits.
        """
        popen = self._popen
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if popen is not None:
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
            self._popen = None
        if self._qmp_client is not None:
            client, self._qmp_client = self._qmp_client, None
            with contextlib.suppress(VmTimeout, QMPError, OSError, EOFError):
                self._loop.run(client.disconnect(), 5.0, "closing QMP")
        for name in (cl.QMP_SOCKET, cl.QGA_SOCKET, cl.PIDFILE):
            self._path(name).unlink(missing_ok=True)

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
        agent = self._agent_or_fail()
        try:
            st = host_path.stat()
        except OSError as exc:
            raise InputError(f"cannot read {host_path}: {exc.strerror}") from exc
        if stat.S_ISREG(st.st_mode) and self._transfer.wanted(st.st_size):
            if self._transfer.push(host_path, guest_path, st.st_size):
                return
        try:
            f = host_path.open("rb")
        except OSError as exc:
            raise InputError(f"cannot read {host_path}: {exc.strerror}") from exc
        with f:
            handle = agent.open(guest_path, "wb")
            try:
                while chunk := f.read(CHUNK):
                    agent.write(handle, chunk)
            finally:
                agent.close_file(handle)

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
        agent = self._agent_or_fail()
        try:
            handle = agent.open(guest_path, "rb")
        except GuestError as exc:
            if is_missing_file(exc):
                raise OutputMissing(f"guest file {guest_path} does not exist") from exc
            raise
        tmp = host_path.with_name(f".{host_path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            try:
                size = agent.size(handle)
            finally:
                agent.close_file(handle)
            if max_bytes is not None and size > max_bytes:
                raise OutputError(
                    f"guest file {guest_path} is {size} bytes, more than the {max_bytes} allowed"
                )
            if self._transfer.wanted(size) and self._transfer.pull(guest_path, tmp, size):
                total = size
            else:
                tmp.unlink(missing_ok=True)
                total = self._pull_by_agent(guest_path, tmp, max_bytes)
            tmp.replace(host_path)
            return total
        finally:
            tmp.unlink(missing_ok=True)

    def _pull_by_agent(self, guest_path: str, tmp: Path, max_bytes: int | None) -> int:
        agent = self._agent_or_fail()
        handle = agent.open(guest_path, "rb")
        try:
            total = 0
            with tmp.open("wb") as f:
                while True:
                    data, eof = agent.read(handle)
                    total += len(data)
                    if max_bytes is not None and total > max_bytes:  # it grew while we read
                        raise OutputError(f"guest file {guest_path} grew past the {max_bytes} bytes allowed")
                    f.write(data)
                    if eof or not data:
                        break
            return total
        finally:
            agent.close_file(handle)

    def read_guest_file(self, guest_path: str, *, max_bytes: int = 65536) -> bytes | None:
        """Return up to ``max_bytes`` of a guest file, or None when it does not exist.

        Raises:
            GuestError: it exists but cannot be read.
        """
        agent = self._agent_or_fail()
        try:
            handle = agent.open(guest_path, "rb")
        except GuestError as exc:
            if is_missing_file(exc):
                return None
            raise
        try:
            out = bytearray()
            while len(out) < max_bytes:
                data, eof = agent.read(handle, min(CHUNK, max_bytes - len(out)))
                out += data
                if eof or not data:
                    break
            return bytes(out[:max_bytes])
        finally:
            agent.close_file(handle)

    # -- snapshots ------------------------------------------------------------
    def _run_job(self, cmd: str, args: Mapping[str, object]) -> None:
        job_id = f"boincvm-{uuid.uuid4().hex[:12]}"
        self.qmp(cmd, {"job-id": job_id, **args})
        deadline = time.monotonic() + self.opts.snapshot_timeout
        while True:
            jobs = self.qmp("query-jobs")
            job = next((j for j in jobs if j.get("id") == job_id), None)
            if job is None:
                raise HypervisorError(f"qemu: {cmd} job {job_id} vanished")
            if job["status"] == "concluded":
                self.qmp("job-dismiss", {"id": job_id})
                if job.get("error"):
                    raise HypervisorError(f"qemu: {cmd}: {job['error']}")
                return
            if time.monotonic() > deadline:
                raise VmTimeout(f"qemu: {cmd} did not finish within {self.opts.snapshot_timeout:g} s")
            time.sleep(0.01)

    def snapshot_create(self, name: str) -> None:
        """Save memory, device state and disk as checkpoint ``name``: a diff against the
        golden RAM where the VM maps one (:mod:`.ramdiff`), else an internal snapshot of
        the overlay with all of memory.

        Raises:
            HypervisorError: a snapshot of that name exists, or saving failed.
        """
        if any(s.name == name for s in self.snapshot_list()):
            raise HypervisorError(f"qemu: snapshot {name!r} already exists; checkpoints need new names")
        # A transfer disk still in the guest would be in the snapshot, which then cannot load.
        qemu_xfer.release_leftovers(self)
        if self._ram_private is not None:  # a task that runs for weeks keeps its golden checkpoint
            qemu_golden.mark_used(self._ram_private)
        if self._diff_possible():
            try:
                self._diff_checkpoint(name)
                return
            except HypervisorError as exc:
                if self._diff_restored or not self.is_running():
                    raise
                # E.g. a security module refusing the reads: the other kind, from now on.
                self._diff_refused = exc.message
                log.warning("a RAM-diff checkpoint failed (%s); checkpoints hold all of RAM now", exc.message)
        self._run_job("snapshot-save", {"tag": name, "vmstate": cl.DISK_NODE, "devices": [cl.DISK_NODE]})

    @property
    def _ram_bytes(self) -> int:
        return self.spec.memory_mb * 1024 * 1024

    def _diff_possible(self) -> bool:
        """Whether this VM's checkpoints can be RAM diffs: it maps a golden RAM privately
        and the host lets this process read QEMU's page map and memory."""
        if self._ram_private is None or self._popen is None:
            return False
        if self._diff_restored:
            return True  # it cannot take the other kind; a refusal shows as an error
        if self._diff_refused is None:
            try:
                for what in ("pagemap", "mem"):
                    os.close(os.open(f"/proc/{self._popen.pid}/{what}", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                self._diff_refused = exc.strerror or str(exc)
                log.warning(
                    "cannot read QEMU's memory (%s): checkpoints hold all of the guest's RAM",
                    self._diff_refused,
                )
        return self._diff_refused is None

    def _diff_checkpoint(self, name: str) -> None:
        assert self._popen is not None and self._ram_private is not None
        pid, ram = self._popen.pid, self._ram_private
        if name in [s.name for s in self._internal_snapshots()]:  # left by a checkpoint that never completed
            self._delete_disk_snapshot(name)

        def build(tmp: Path) -> ramdiff.Manifest:
            running = bool(self.qmp("query-status").get("running"))
            if running:
                self.qmp("stop")
            try:
                self.qmp("blockdev-snapshot-internal-sync", {"device": cl.DISK_NODE, "name": name})
                try:
                    # live=false: with live on, a stopped VM would also give up its disk locks.
                    devices = tmp / ramdiff.DEVICES_FILE
                    self.qmp("xen-save-devices-state", {"filename": str(devices), "live": False})
                    saved = ramdiff.save_ram(pid, ram, tmp / ramdiff.RAM_FILE)
                except BaseException:
                    with contextlib.suppress(HypervisorError, VmTimeout):
                        self._delete_disk_snapshot(name)
                    raise
            finally:
                if running:
                    self.qmp("cont")
            digests = (sha256_file(tmp / ramdiff.RAM_FILE), sha256_file(devices))
            return ramdiff.Manifest(ram, self._ram_bytes, *digests, saved)

        try:
            m = ramdiff.write(ramdiff.checkpoint_dir(self.workdir, name), build)
        except OSError as exc:
            raise HypervisorError(f"qemu: checkpoint {name} could not be written: {exc}") from exc
        log.debug("checkpoint %s: %d pages of RAM (%d zero), %d bytes", name, m.saved.pages,
                  m.saved.zero_pages, m.saved.data_bytes)  # fmt: skip

    def _delete_disk_snapshot(self, name: str) -> None:
        self.qmp("blockdev-snapshot-delete-internal-sync", {"device": cl.DISK_NODE, "name": name})

    def _offline_snapshots(self) -> list[SnapshotInfo]:
        overlay = self._path(OVERLAY)
        if not overlay.exists():
            return []
        info = json.loads(proc.run([*_img(), "info", "-U", "--output=json", overlay], timeout=60).text)
        return self._complete(
            [SnapshotInfo(s["name"], s.get("vm-state-size")) for s in info.get("snapshots", [])]
        )

    def _complete(self, internal: list[SnapshotInfo]) -> list[SnapshotInfo]:
        """The checkpoints among the overlay's internal snapshots: those with memory, and the
        disk halves of complete RAM-diff checkpoints (sized by their directory)."""
        diffs = set(ramdiff.names(self.workdir))
        out = []
        for s in internal:
            if s.name in diffs:
                out.append(SnapshotInfo(s.name, ramdiff.size(ramdiff.checkpoint_dir(self.workdir, s.name))))
            elif s.size_bytes:
                out.append(s)
        return out

    def _internal_snapshots(self) -> list[SnapshotInfo]:
        for node in self.qmp("query-named-block-nodes", {"flat": True}):
            if node.get("node-name") == cl.DISK_NODE:
                snaps = node.get("image", {}).get("snapshots", [])
                return [SnapshotInfo(s["name"], s.get("vm-state-size")) for s in snaps]
        return []

    def snapshot_list(self) -> list[SnapshotInfo]:
        """The VM's checkpoints (read through QMP while running, qemu-img otherwise)."""
        if not self.is_running():
            return self._offline_snapshots()
        return self._complete(self._internal_snapshots())

    def snapshot_revert(self, name: str) -> None:
        """Load snapshot ``name`` into the running VM, continue it and set the guest clock.

        Raises:
            HypervisorError: no such snapshot, or loading failed.
        """
        if ramdiff.is_complete(ramdiff.checkpoint_dir(self.workdir, name)):
            # A diff applies to the golden RAM alone: a new QEMU starts from it.
            self.power_off()
            self.power_on(snapshot=name)
            return
        self._start_t0, self.start_timings = time.monotonic(), {}
        self._run_job("snapshot-load", {"tag": name, "vmstate": cl.DISK_NODE, "devices": [cl.DISK_NODE]})
        self._ensure_running()
        self._finished.clear()
        self._after_restore()

    def snapshot_delete(self, name: str) -> None:
        """Delete snapshot ``name`` (through QMP while running, qemu-img otherwise).

        Raises:
            HypervisorError: no such snapshot, or deleting failed.
        """
        ramdiff.remove(ramdiff.checkpoint_dir(self.workdir, name))  # first: then it is no checkpoint
        if self.is_running():
            self._run_job("snapshot-delete", {"tag": name, "devices": [cl.DISK_NODE]})
        else:
            proc.run([*_img(), "snapshot", "-d", name, self._path(OVERLAY)], timeout=120)

    # -- accounting -----------------------------------------------------------
    def host_cpu_time(self) -> float:
        """CPU seconds of this object's QEMU processes (user + system, with reaped children)."""
        now = _proc_cpu_seconds(self._popen.pid) if self._popen is not None else None
        return self._cpu_before + (now or 0.0)

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


def _save_golden(boot: VmSpec, state: Path) -> None:
    """Boot ``boot``, wait for its agent, stop it and migrate its state into ``state``.

    The state goes out through a descriptor handed to QEMU over QMP (``getfd``), the way
    :meth:`QemuBackend._start_from_golden` reads it back through an inherited one: no shell,
    no ``cat``, no pipe.

    Raises:
        HypervisorError: the boot or the migration failed.
        GuestToolsMissing: the guest agent never answered.
        VmTimeout: the migration did not finish within 120 s.
    """
    with QemuBackend(boot) as vm:
        vm.golden_ram_out = state.with_name(qemu_golden.GOLDEN_RAM)
        vm.power_on()
        vm.wait_for_tools()
        vm.qmp("stop")
        # The RAM is in golden.ram already (mapped shared): the stream carries the devices.
        vm.qmp("migrate-set-capabilities", {"capabilities": [IGNORE_SHARED]})
        vm.qmp("migrate-set-parameters", {"max-bandwidth": 16 * 1024**3})
        vm.send_fd("golden-state", state)
        vm.qmp("migrate", {"uri": "fd:golden-state"})
        deadline = time.monotonic() + 120
        while (status := vm.qmp("query-migrate").get("status")) not in ("completed", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise VmTimeout("saving the golden checkpoint did not finish within 120 s")
            time.sleep(0.01)
        if status != "completed":
            raise HypervisorError(f"qemu: saving the golden checkpoint {status}")
