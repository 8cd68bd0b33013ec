"""The VMware backend (Workstation Pro, Fusion Pro; legacy Player with the VIX SDK), driven through vmrun.

Per-task isolation
    Each slot gets a **linked clone** of the base VM in ``spec.workdir/vm/``
    (``vmrun clone BASE.vmx CLONE.vmx linked -snapshot=boincvm-base``). The clone's disk is
    a delta on top of the base's snapshot, so nothing multi-GB is copied and the base is
    never written by a task; several tasks can share one base at once, each with its own
    VM process and snapshots. The clone's snapshots (the checkpoints) live in the workdir,
    so a restarted wrapper resumes from them. The one write to the base happens once: if
    the base VM has no snapshot named ``base_snapshot`` it is created (under a lock file)
    before the first clone. Ship the base VM with that snapshot to keep it read-only.

App versions (``spec.image_files``)
    ``package-image`` ships a VM directory as app-version files, which BOINC keeps immutable
    in the project directory. The backend rebuilds the directory in ``workdir/base`` under the
    original names (small files copied, large ones linked, see
    :func:`~boincvm.hypervisor.vmware.files.rebuild_vm_dir`) and clones from there. Such a VM
    must already have the base snapshot: without it the task fails instead of snapshotting.

Settings the job controls are written into the clone's .vmx before power-on (memory,
vCPUs, network off unless enabled, ``msg.autoAnswer``, no sound/USB/floppy, no
copy/paste/drag-and-drop, manual Tools upgrades): see :func:`job_settings`.

Two guest channels (option ``channel``: ``auto``, ``guestinfo``, ``guestops``)
    **guestinfo, the default when no guest user is configured: no credentials at all.**
    ``vmrun readVariable/writeVariable VMX guestVar NAME`` reach the guest's ``guestinfo.*``
    namespace without a guest login, and a shared folder carries files: the slot's
    ``workdir/share`` is shared as ``.host:/boinc`` (``sharedFolder0.*`` keys written before
    power-on, ``enableSharedFolders`` after every start and revert, since a revert restores the
    snapshot's shared-folder state). A small agent in the image
    (:data:`~boincvm.hypervisor.vmware.config.AGENT_SCRIPT`, POSIX sh over open-vm-tools'
    ``vmware-rpctool``, run as a boot service) announces itself in ``guestinfo.boinc.agent``,
    runs each job the host writes to ``guestinfo.boinc.job`` (``"<n> <shell line>"``) and
    acknowledges it in ``guestinfo.boinc.ack``. Job results (pid, stdout, stderr, exit code)
    are files on the share, so polling costs no vmrun call; file copies are ``cp`` jobs
    through ``share/xfer``. See :mod:`boincvm.hypervisor.vmware.guestinfo`.

    **guestops, the default when ``guest_user`` is set: VIX guest operations.**
    ``runProgramInGuest``, the file copies and ``listProcessesInGuest`` need
    ``-gu USER -gp PASSWORD``, and **vmrun accepts the password only on its command line**,
    so for the duration of each such call it is visible to other local users through
    ``ps``. boincvm reads the password from a file (``guest_password_file``) or an
    environment variable (``guest_password_env``), never from the job options themselves,
    and redacts it from every log line and error. Use a dedicated, unprivileged guest account
    with a non-empty password that protects nothing else. A program is started with
    ``runProgramInGuest -noWait /bin/sh -c SCRIPT``; the script claims a job directory,
    records its shell's PID, runs the program with its output redirected to files, then
    writes the exit status to ``rc`` atomically (``rc.tmp`` renamed), because neither vmrun
    nor VIX can report the exit code of a program started without waiting. Polls copy ``rc``
    out and, every few seconds while it is absent, look for the PID in
    ``listProcessesInGuest``.

    In both channels ``GuestProcess.pid`` is the backend's job number, not a guest PID; guest
    scripts are POSIX sh (Linux and other Unix guests); an exit status of 128+N is reported
    as death by signal N (sh cannot tell the two apart).

pyvix
    ``pip install boincvm[vmware]`` adds pyvix 0.4.3. Where it imports (it needs the VIX
    library), the backend uses it to power on and to wait for the Tools
    (``VixVM_WaitForToolsInGuest`` waits inside VIX instead of polling a subprocess); each
    call runs in a thread bounded by a timeout. Everything else uses vmrun because pyvix 0.4.3
    has no snapshots, no file copy, no exit codes and no guestinfo. Any pyvix failure falls
    back to vmrun. ``pyvix = "off"`` disables it (its README reports a crash with Workstation 15).

Options (``spec.options``): ``vmrun`` (path), ``host_type`` (ws, fusion, player; default ws,
fusion on macOS, falling back to player when ``-T ws`` names a missing provider),
``channel``, ``guest_user``, ``guest_password_file``, ``guest_password_env``,
``vm_password_file`` (encrypted VMs: ``-vp`` on every call), ``base_snapshot`` (default
``boincvm-base``), ``guest_tmp`` (default ``/tmp/boincvm``), ``pyvix`` (auto, off),
``call_timeout`` (seconds per vmrun call, default 120), ``gui`` (true to open a window).
Passwords given inline (``guest_password``) are refused.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from boincvm import proc
from boincvm.errors import (
    GuestError,
    GuestToolsMissing,
    HypervisorError,
    HypervisorUnavailable,
    InputError,
    OutputError,
    OutputMissing,
    UnsupportedOperation,
)
from boincvm.hypervisor.base import (
    Availability,
    Backend,
    BackendKind,
    GuestProcess,
    ProcessStatus,
    SnapshotInfo,
    VmSpec,
)
from boincvm.hypervisor.vmware import vmrun as vr
from boincvm.hypervisor.vmware.config import (
    VmwareOptions,
    check_var,
    job_settings,
    read_secret,
    share_settings,
)
from boincvm.hypervisor.vmware.files import base_vmx
from boincvm.hypervisor.vmware.guestinfo import GuestinfoChannel
from boincvm.hypervisor.vmware.guestops import GuestopsChannel, read_fetched
from boincvm.hypervisor.vmware.host import LockFile, Pyvix, bounded, norm, vmx_process_cpu_seconds
from boincvm.hypervisor.vmware.vmx import VmxFile

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 900.0
#: Where an app version's base VM is rebuilt, in the slot's VM work directory.
BASE_DIR = "base"


class VmwareBackend(Backend, kind=BackendKind.VMWARE):
    """One VMware VM (a linked clone of the base .vmx), driven through vmrun.

    Raises (any method, besides those of :class:`Backend`):
        InputError: the options are malformed, or the image is not a .vmx.
        HypervisorUnavailable: vmrun is missing or does not fit the product.
        VmTimeout: a vmrun call ran past its timeout.
        GuestToolsMissing: the VMware Tools are not running.
        UnsupportedOperation: guest operations without credentials; CPU time off Linux.
    """

    def __init__(self, spec: VmSpec) -> None:
        super().__init__(spec)
        self.opts = VmwareOptions.from_options(spec.options)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.name) or "vm"
        self.vmx = spec.workdir / "vm" / f"{safe}.vmx"
        self._vmrun: vr.Vmrun | None = None
        self._login: vr.GuestLogin | None = None
        self._accel: Pyvix | None = None
        self._accel_tried = False
        self._tools_seen = False
        self._cpu_seconds = 0.0
        self.share = spec.workdir / "share"
        self._gi: GuestinfoChannel | None = None
        self.channel: GuestinfoChannel | GuestopsChannel
        if self.opts.uses_guestinfo:
            self.channel = self._gi = GuestinfoChannel(
                lambda command, params: self._call(command, self.vmx, params),
                self.share,
                self._next_job_number,
                self.opts.call_timeout,
            )
        else:
            self.channel = GuestopsChannel(
                lambda command, params: self._call(command, self.vmx, params, login=self.login),
                self.opts.guest_tmp,
                self._next_job_number,
                self._scratch,
            )

    @classmethod
    def check_options(cls, options: Mapping[str, str]) -> None:
        """See :class:`~.vmware_config.VmwareOptions`.

        Raises:
            InputError: an unknown option, an inline password or a value vmrun does not accept.
        """
        VmwareOptions.from_options(options)

    # -- availability ----------------------------------------------------------------
    @classmethod
    def probe(cls) -> Availability:
        """Say whether vmrun can be found here (``$BOINCVM_VMRUN``, PATH, install locations)."""
        path = vr.find_vmrun()
        if path is None:
            where = ", ".join(str(p) for p in vr.default_locations())
            return Availability(False, "vmrun not found", detail=f"looked on PATH and in: {where}")
        version = vr.Vmrun(path).version()
        return Availability(True, f"vmrun {version or '(unknown version)'} at {path}")

    # -- plumbing ------------------------------------------------------------------------
    @property
    def vmrun(self) -> vr.Vmrun:
        """The vmrun transport, located on first use.

        Raises:
            HypervisorUnavailable: vmrun was not found.
        """
        if self._vmrun is None:
            path = vr.find_vmrun(self.opts.vmrun)
            if path is None:
                raise HypervisorUnavailable("vmware: vmrun not found", hint=proc.INSTALL_HINTS["vmrun"])
            vp = (
                read_secret(self.opts.vm_password_file, "vm_password_file")
                if self.opts.vm_password_file
                else None
            )
            self._vmrun = vr.Vmrun(
                path, self.opts.host_type or vr.default_host_type(), vp, self.opts.call_timeout
            )
        return self._vmrun

    def _call(
        self,
        command: str,
        vmx: Path | None = None,
        params: Sequence[str] = (),
        *,
        login: vr.GuestLogin | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> proc.Completed:
        try:
            return self.vmrun.call(command, vmx, params, login=login, timeout=timeout, check=check)
        except vr.WrongHostType:
            # Only Player (with the VIX SDK) installed: -T ws names the Workstation provider.
            if self.opts.host_type is not None or self.vmrun.host_type is not vr.HostType.WS:
                raise
            log.debug("vmrun -T ws refused; trying -T player")
            self._vmrun = vr.Vmrun(
                self.vmrun.path, vr.HostType.PLAYER, self.vmrun.vm_password, self.vmrun.timeout
            )
            return self.vmrun.call(command, vmx, params, login=login, timeout=timeout, check=check)

    @property
    def login(self) -> vr.GuestLogin:
        """The guest credentials from the options.

        Raises:
            UnsupportedOperation: no guest user or password source is configured.
            InputError: the password file or variable is unreadable or empty.
        """
        if self._login is None:
            o = self.opts
            if not o.guest_user or not (o.guest_password_file or o.guest_password_env):
                raise UnsupportedOperation(
                    "vmware: guest operations need credentials (vmrun has no anonymous guest operations)",
                    hint="set guest_user and guest_password_file (or guest_password_env)",
                )
            if o.guest_password_file is not None:
                password = read_secret(o.guest_password_file, "guest_password_file")
            else:
                password = os.environ.get(o.guest_password_env or "", "")
                if not password:
                    raise InputError(f"options.guest_password_env: ${o.guest_password_env} is unset or empty")
            self._login = vr.GuestLogin(o.guest_user, password)
        return self._login

    def _accelerator(self) -> Pyvix | None:
        if self.opts.pyvix and not self._accel_tried:
            self._accel_tried = True
            self._accel = Pyvix.open(self.vmx)
        return self._accel

    # -- power ---------------------------------------------------------------------------
    def power_on(self, *, snapshot: str | None = None) -> None:
        """Create the linked clone if needed and start it, fresh or from ``snapshot``.

        Raises:
            InputError: the image is not a .vmx file.
            SnapshotNotFound: ``snapshot`` does not exist in this slot's clone.
        """
        if snapshot is not None:
            if not self.vmx.is_file():
                raise vr.SnapshotNotFound(f"vmware: no VM in {self.spec.workdir} to revert to {snapshot!r}")
            if self.spec.image_files:
                base_vmx(self.spec, self.spec.workdir / BASE_DIR)  # the clone's parent disks live there
            self._call("revertToSnapshot", self.vmx, [snapshot], timeout=SNAPSHOT_TIMEOUT)
            self._after_revert()
            return
        if self.vmx.is_file():
            self._discard_clone()
        self._make_clone()
        self._start()

    def _after_revert(self) -> None:
        self.channel.forget()
        if not self.is_running():
            self._start()
        else:
            self.channel.after_start()  # the revert restored the snapshot's shared-folder state

    def _start(self) -> None:
        self._power_on_vm()
        self.channel.after_start()

    def _power_on_vm(self) -> None:
        accel = self._accelerator()
        if accel is not None and not self.opts.gui:
            try:
                bounded(lambda: accel.vm.poweron(0), self.opts.call_timeout, "poweron")
                return
            except Exception as exc:  # noqa: BLE001 - fall back to vmrun
                log.debug("pyvix poweron failed (%s); using vmrun", exc)
        self._call("start", self.vmx, ["gui" if self.opts.gui else "nogui"])

    def _make_clone(self) -> None:
        base = base_vmx(self.spec, self.spec.workdir / BASE_DIR)
        name = self.opts.base_snapshot
        if name not in vr.parse_snapshots(self._call("listSnapshots", base).text):
            if self.spec.image_files:
                # Taking it here would write a delta disk next to the project's files.
                raise InputError(
                    f"vmware: the app version's VM has no snapshot {name!r}",
                    hint="package the VM again with boincvm package-image, which requires that snapshot",
                )
            with LockFile(base.with_name(base.name + ".boincvm-lock"), self.opts.call_timeout):
                if name not in vr.parse_snapshots(self._call("listSnapshots", base).text):
                    log.info("vmware: creating snapshot %r of the base VM %s (once)", name, base.name)
                    self._call("snapshot", base, [name], timeout=SNAPSHOT_TIMEOUT)
        self.vmx.parent.mkdir(parents=True, exist_ok=True)
        self._call(
            "clone",
            base,
            [str(self.vmx), "linked", f"-snapshot={name}", f"-cloneName={self.spec.name}"],
            timeout=SNAPSHOT_TIMEOUT,
        )
        vmx = VmxFile.load(self.vmx)
        settings = job_settings(vmx, self.spec)
        if self._gi is not None:
            self.share.mkdir(parents=True, exist_ok=True)
            settings.update(share_settings(self.share.resolve()))
        vmx.with_values(settings).save(self.vmx)

    def _discard_clone(self) -> None:
        self._stop_hard()
        try:
            self._call("deleteVM", self.vmx)
        except HypervisorError as exc:
            log.debug("vmrun deleteVM failed (%s); removing the files", exc)
        shutil.rmtree(self.vmx.parent, ignore_errors=True)
        self.channel.forget()
        self._accel, self._accel_tried = None, False  # a pyvix handle names the deleted VM

    def wait_for_tools(self, timeout: float | None = None) -> None:
        """Wait until ``checkToolsState`` says ``running`` and (with credentials) a guest operation works.

        Raises:
            GuestToolsMissing: not in time.
            VmNotRunning: the VM is off.
            GuestCredentialsRejected: the guest refused the credentials (not retried).
        """
        limit = self.spec.boot_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        accel = self._accelerator()
        done = False
        if accel is not None:
            try:
                bounded(lambda: accel.vm.waitfortools(max(1, int(limit))), limit + 5, "waitfortools")
                done = True
            except Exception as exc:  # noqa: BLE001 - fall back to polling with vmrun
                log.debug("pyvix waitfortools failed (%s); polling vmrun", exc)
        delay = 0.05
        while not done:
            # checkToolsState exits non-zero for "unknown": read stdout, not the exit code.
            out = self._call("checkToolsState", self.vmx, check=False)
            state = out.text.strip().splitlines()[-1:] if out.text.strip() else []
            if state == ["running"]:
                break
            if "Error:" in out.text:
                err = vr.error_for("checkToolsState", out.text, out.returncode)
                if isinstance(err, vr.VmNotRunning):
                    raise err
            if time.monotonic() + delay > deadline:
                raise GuestToolsMissing(
                    f"vmware: the VMware Tools did not start within {limit:g} s",
                    hint="install open-vm-tools (Linux) or VMware Tools in the image",
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        if self._gi is not None or self.opts.guest_user:
            self.channel.wait_ready(deadline)
        self._tools_seen = True

    def power_off(self, *, soft_timeout: float = 10.0) -> None:
        """``stop soft`` (bounded by ``soft_timeout``), then ``stop hard``. Idempotent."""
        if not self.vmx.is_file() or not self.is_running():
            return
        self._sample_cpu()
        try:
            self._call("stop", self.vmx, ["soft"], timeout=soft_timeout)
        except (HypervisorError, GuestError) as exc:
            log.debug("vmware: soft stop failed (%s); stopping hard", exc)
        if self.is_running():
            self._stop_hard()

    def _stop_hard(self) -> None:
        try:
            self._call("stop", self.vmx, ["hard"])
        except vr.VmNotRunning:
            pass

    def is_running(self) -> bool:
        """True while ``vmrun list`` shows this slot's clone."""
        me = norm(self.vmx)
        return any(norm(Path(p)) == me for p in vr.parse_list(self._call("list").text))

    def pause(self) -> None:
        """``vmrun pause``: the guest's CPUs stop, its memory stays."""
        self._call("pause", self.vmx)

    def resume(self) -> None:
        """``vmrun unpause``."""
        self._call("unpause", self.vmx)

    # -- guest programs ------------------------------------------------------------------
    def start_program(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None
    ) -> GuestProcess:
        """Start ``argv`` in the guest through a POSIX sh wrapper that records its exit code.

        Raises:
            UnsupportedOperation: no guest credentials are configured.
            InputError: an environment variable name is not a shell identifier.
        """
        if not argv:
            raise InputError("vmware: cannot start an empty command line")
        return self.channel.start(argv, env or {}, cwd)

    def _next_job_number(self) -> int:
        counter = self.spec.workdir / "vmware-jobs"
        try:
            last = int(counter.read_text())
        except (OSError, ValueError):
            last = 0
        n = last + 1
        counter.write_text(str(n))
        return n

    def poll_program(self, proc: GuestProcess) -> ProcessStatus:
        """Say whether the job still runs; once its exit status exists, return it with the output tails."""
        return self.channel.poll(proc)

    # -- files -----------------------------------------------------------------------------
    def _scratch(self) -> Path:
        d = self.spec.workdir / "vmware-scratch"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"f{time.monotonic_ns()}"

    def copy_to_guest(self, host_path: Path, guest_path: str) -> None:
        """``CopyFileFromHostToGuest``.

        Raises:
            InputError: the host file does not exist.
            OutputError: the guest directory does not exist.
        """
        if not host_path.is_file():
            raise InputError(f"vmware: {host_path} is not a file")
        self.channel.copy_to(host_path, guest_path)

    def copy_from_guest(self, guest_path: str, host_path: Path, *, max_bytes: int | None = None) -> int:
        """``CopyFileFromGuestToHost`` into a temporary name, size-checked, then renamed.

        vmrun cannot stat a guest file, so a file over ``max_bytes`` is copied, then removed.

        Raises:
            OutputError: the guest file is missing or larger than ``max_bytes``.
        """
        part = host_path.with_name(f".{host_path.name}.part")
        try:
            fetched = self.channel.fetch(guest_path)
            if fetched is None:
                raise OutputMissing(f"vmware: guest file {guest_path} does not exist")
            shutil.move(fetched, part)
            size = part.stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise OutputError(
                    f"vmware: guest file {guest_path} is {size} bytes, more than the {max_bytes} allowed"
                )
            part.replace(host_path)
            return size
        finally:
            part.unlink(missing_ok=True)

    def read_guest_file(self, guest_path: str, *, max_bytes: int = 65536) -> bytes | None:
        """Copy a small guest file out and return at most ``max_bytes`` of it, or None if it is missing."""
        return read_fetched(self.channel.fetch, guest_path, max_bytes)

    # -- snapshots -------------------------------------------------------------------------
    def snapshot_create(self, name: str) -> None:
        """``vmrun snapshot`` (a running VM's snapshot includes its memory; vmrun has no switch).

        Raises:
            HypervisorError: a snapshot of that name exists already (VMware would allow a duplicate).
        """
        if name in self._snapshot_names():
            raise HypervisorError(f"vmware: snapshot {name!r} exists already")
        self._call("snapshot", self.vmx, [name], timeout=SNAPSHOT_TIMEOUT)

    def _snapshot_names(self) -> list[str]:
        return vr.parse_snapshots(self._call("listSnapshots", self.vmx).text)

    def _snapshot_call(self, command: str, name: str) -> None:
        """``vmrun COMMAND VMX NAME`` on a snapshot that must exist.

        Raises:
            SnapshotNotFound: no such snapshot.
        """
        if name not in self._snapshot_names():
            raise vr.SnapshotNotFound(f"vmware: no snapshot named {name!r}")
        self._call(command, self.vmx, [name], timeout=SNAPSHOT_TIMEOUT)

    def snapshot_list(self) -> list[SnapshotInfo]:
        """``vmrun listSnapshots`` (sizes are not reported)."""
        return [SnapshotInfo(n) for n in self._snapshot_names()]

    def snapshot_revert(self, name: str) -> None:
        """``revertToSnapshot``, then start the VM if the revert left it off, then wait for the Tools again.

        Raises:
            SnapshotNotFound: no such snapshot.
        """
        self._snapshot_call("revertToSnapshot", name)
        self._after_revert()
        if self._tools_seen:
            self.wait_for_tools()

    def snapshot_delete(self, name: str) -> None:
        """``deleteSnapshot`` (its delta is merged, which can take a while).

        Raises:
            SnapshotNotFound: no such snapshot.
        """
        self._snapshot_call("deleteSnapshot", name)

    # -- guestinfo and shared folders (the credential-free channel) ------------------------------
    def guestinfo_read(self, name: str) -> str | None:
        """``readVariable guestVar NAME``: the guest's ``guestinfo.NAME``, or None when unset (no login)."""
        check_var(name)
        value = self._call("readVariable", self.vmx, ["guestVar", name]).text.rstrip("\r\n")
        return value or None

    def guestinfo_write(self, name: str, value: str) -> None:
        """``writeVariable guestVar NAME VALUE`` (runtime only, no login needed).

        Raises:
            InputError: the name contains ``/`` or whitespace.
        """
        check_var(name)
        self._call("writeVariable", self.vmx, ["guestVar", name, value])

    def share_folder(self, host_dir: Path, share: str = "boinc", *, writable: bool = True) -> None:
        """Share ``host_dir`` with the running guest as ``.host:/SHARE`` (re-run after a revert)."""
        self._call("enableSharedFolders", self.vmx)
        self._call("addSharedFolder", self.vmx, [share, str(host_dir)])
        self._call(
            "setSharedFolderState", self.vmx, [share, str(host_dir), "writable" if writable else "readonly"]
        )

    # -- accounting ------------------------------------------------------------------------
    def host_cpu_time(self) -> float:
        """CPU seconds of this VM's ``vmware-vmx`` process and its children, found by the .vmx path.

        After power-off the last sample is returned.

        Raises:
            UnsupportedOperation: not on Linux (the process table is read from /proc).
        """
        if not sys.platform.startswith("linux"):
            raise UnsupportedOperation(
                f"vmware: host CPU time is read from /proc on Linux; not implemented on {sys.platform}"
            )
        self._sample_cpu()
        return self._cpu_seconds

    def _sample_cpu(self) -> None:
        if sys.platform.startswith("linux"):
            seconds = vmx_process_cpu_seconds(self.vmx)
            if seconds is not None:
                self._cpu_seconds = max(self._cpu_seconds, seconds)
