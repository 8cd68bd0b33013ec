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

Settings the job controls are written into the clone's .vmx before power-on (memory,
vCPUs, network off unless enabled, ``msg.autoAnswer``, no sound/USB/floppy, no
copy/paste/drag-and-drop, manual Tools upgrades): see :func:`job_settings`.

Guest operations and credentials
    vmrun has no anonymous guest operations: ``runProgramInGuest``, the file copies and
    ``listProcessesInGuest`` need ``-gu USER -gp PASSWORD``, and **vmrun accepts the password
    only on its command line**, so for the few hundred milliseconds of each such call it is
    visible to other local users through ``ps``. boincvm reads the password from a file
    (``guest_password_file``) or an environment variable (``guest_password_env``), never
    from the job options themselves, and redacts it from every log line and error. Use a
    dedicated, unprivileged guest account whose password protects nothing else.

    A program is started with ``runProgramInGuest -noWait /bin/sh -c SCRIPT``; the script
    records its shell's PID, runs the program with its output redirected to files, then
    writes the exit code to ``rc`` atomically (``rc.tmp`` renamed), because neither vmrun nor
    VIX can report the exit code of a program started without waiting. Polls read ``rc``
    and check the PID with ``listProcessesInGuest``. ``GuestProcess.pid`` is the backend's job
    number (the job directory is ``<guest_tmp>/job-<n>``), not a guest PID. Guest scripts are
    POSIX sh: Linux (and other Unix) guests only.

Running without guest credentials (documented design; host side in :meth:`VmwareBackend.guestinfo_read`,
:meth:`VmwareBackend.guestinfo_write` and :meth:`VmwareBackend.share_folder`)
    ``vmrun readVariable/writeVariable VMX guestVar NAME`` reach the ``guestinfo.*``
    namespace without any guest login, and shared folders (HGFS) move files. A small agent
    in the image (a systemd unit) loops: ``vmware-rpctool "info-get guestinfo.boinc.job"``
    gives it a job number and command (JSON: argv, env, cwd); it runs it with the working
    directory on the share (``vmhgfs-fuse .host:/boinc /mnt/boinc``), and publishes
    ``vmware-rpctool "info-set guestinfo.boinc.state running|done"``, ``guestinfo.boinc.rc N``
    and a heartbeat; the host polls ``readVariable``. Inputs and outputs are files in the
    shared host directory, so no copy command is needed. Shared-folder state is restored
    by a revert, so the host re-runs ``enableSharedFolders`` after every revert.

pyvix
    ``pip install boincvm[vmware]`` adds pyvix 0.4.3. Where it imports (it needs the VIX
    library), the backend uses it to power on and to wait for the Tools (VixVM_WaitForToolsInGuest
    waits inside VIX instead of polling a subprocess), bounded by a timeout. Everything else
    uses vmrun because pyvix 0.4.3 has no snapshots, no file copy, no exit codes and no
    guestinfo. Any pyvix failure falls back to vmrun. ``pyvix = "off"`` disables it (its README
    reports a crash with Workstation 15).

Options (``spec.options``): ``vmrun`` (path), ``host_type`` (ws, fusion, player),
``guest_user``, ``guest_password_file``, ``guest_password_env``, ``vm_password_file``
(encrypted VMs), ``base_snapshot`` (default ``boincvm-base``), ``guest_tmp`` (default
``/tmp/boincvm``), ``pyvix`` (auto, off), ``call_timeout`` (seconds, default 120), ``gui``
(true to open a window).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from boincvm import proc
from boincvm.errors import (
    GuestError,
    GuestToolsMissing,
    HypervisorError,
    HypervisorUnavailable,
    InputError,
    OutputError,
    UnsupportedOperation,
)
from boincvm.hypervisor import vmrun as vr
from boincvm.hypervisor.base import (
    Availability,
    Backend,
    BackendKind,
    GuestProcess,
    ProcessStatus,
    SnapshotInfo,
    VmSpec,
)
from boincvm.hypervisor.vmware_config import (
    VmwareOptions,
    check_var,
    job_settings,
    read_secret,
    share_settings,
    wrapper_script,
)
from boincvm.hypervisor.vmware_guestinfo import GuestinfoChannel
from boincvm.hypervisor.vmware_host import LockFile, Pyvix, bounded, norm, vmx_process_cpu_seconds
from boincvm.hypervisor.vmware_vmx import VmxFile

log = logging.getLogger(__name__)

OUTPUT_TAIL = 64 * 1024
SNAPSHOT_TIMEOUT = 900.0
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
        self._jobs: dict[int, _Job] = {}
        self._accel: Pyvix | None = None
        self._accel_tried = False
        self._tools_seen = False
        self._cpu_seconds = 0.0
        self.share = spec.workdir / "share"
        self._gi: GuestinfoChannel | None = None
        if self.opts.uses_guestinfo:
            self._gi = GuestinfoChannel(
                lambda command, params: self._call(command, self.vmx, params),
                self.share,
                self._next_job_number,
                self.opts.call_timeout,
            )

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
            self._call("revertToSnapshot", self.vmx, [snapshot], timeout=SNAPSHOT_TIMEOUT)
            self._after_revert()
            return
        if self.vmx.is_file():
            self._discard_clone()
        self._make_clone()
        self._start()

    def _after_revert(self) -> None:
        self._jobs.clear()
        if not self.is_running():
            self._start()
        elif self._gi is not None:
            self._gi.after_start()  # the revert restored the snapshot's shared-folder state

    def _start(self) -> None:
        self._power_on_vm()
        if self._gi is not None:
            self._gi.after_start()

    def _power_on_vm(self) -> None:
        accel = self._accelerator()
        if accel is not None and not self.opts.gui:
            try:
                bounded(lambda: accel.vm.poweron(0), self.opts.call_timeout, "poweron")
                return
            except Exception as exc:  # noqa: BLE001 - fall back to vmrun
                log.debug("pyvix poweron failed (%s); using vmrun", exc)
        self._call("start", self.vmx, ["gui" if self.opts.gui else "nogui"])

    def _base(self) -> Path:
        image = self.spec.image
        if image is None or image.suffix.lower() != ".vmx":
            raise InputError(
                f"vmware: the image must be a VMware .vmx file, not {image.name if image else 'none'}",
                hint="ship the base VM's .vmx and disks; a bare .vmdk needs a .vmx around it",
            )
        if not image.is_file():
            raise InputError(f"vmware: {image} does not exist")
        return image

    def _make_clone(self) -> None:
        base = self._base()
        name = self.opts.base_snapshot
        if name not in vr.parse_snapshots(self._call("listSnapshots", base).text):
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
        self._jobs.clear()

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
        if self._gi is not None:
            self._gi.wait_ready(deadline)
        elif self.opts.guest_user:
            # "running" comes slightly before guest operations work: retry a harmless one.
            while True:
                try:
                    out = self._call("directoryExistsInGuest", self.vmx, ["/"], login=self.login)
                    log.debug("vmware: guest operations work (%s)", out.text.strip())
                    break
                except GuestToolsMissing:
                    if time.monotonic() + delay > deadline:
                        raise
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
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
        if self._gi is not None:
            return self._gi.start(argv, env or {}, cwd)
        login = self.login
        n = self._next_job_number()
        job = _Job(f"{self.opts.guest_tmp}/job-{n}")
        script = wrapper_script(job.directory, argv, env or {}, cwd)
        # vmrun joins the arguments and the guest runs '"prog" args' through a shell: quote.
        self._call(
            "runProgramInGuest", self.vmx, ["-noWait", "/bin/sh", "-c", shlex.quote(script)], login=login
        )
        self._jobs[n] = job
        return GuestProcess(n, tuple(argv))

    def _next_job_number(self) -> int:
        counter = self.spec.workdir / "vmware-jobs"
        try:
            last = int(counter.read_text())
        except (OSError, ValueError):
            last = 0
        n = max(last, max(self._jobs, default=0)) + 1
        counter.write_text(str(n))
        return n

    def poll_program(self, proc: GuestProcess) -> ProcessStatus:
        """Read the job's ``rc`` file; while absent, check its shell's PID with ``listProcessesInGuest``."""
        if self._gi is not None:
            return self._gi.poll(proc)
        job = self._jobs.setdefault(proc.pid, _Job(f"{self.opts.guest_tmp}/job-{proc.pid}", checked=0.0))
        status = self._finished(job)
        if status is not None:
            return status
        # Each vmrun call costs a VIX connection: look at the process list only now and then.
        now = time.monotonic()
        if now - job.checked < LIVENESS_INTERVAL:
            return ProcessStatus(running=True)
        job = self._jobs[proc.pid] = replace(job, checked=now)
        if job.guest_pid is None:
            pid = self.read_guest_file(f"{job.directory}/pid", max_bytes=64)
            if pid is None or not pid.strip().isdigit():
                return ProcessStatus(running=True)
            job = self._jobs[proc.pid] = replace(job, guest_pid=int(pid.strip()))
        listing = self._call("listProcessesInGuest", self.vmx, login=self.login).text
        if any(p.pid == job.guest_pid for p in vr.parse_processes(listing)):
            return ProcessStatus(running=True)
        status = self._finished(job)  # it may have ended between the two looks
        if status is not None:
            return status
        return ProcessStatus(
            running=False,
            exit_code=None,
            stderr_tail=b"vmware: the guest program vanished without an exit status",
        )

    def _finished(self, job: _Job) -> ProcessStatus | None:
        rc = self.read_guest_file(f"{job.directory}/rc", max_bytes=64)
        if rc is None:
            return None
        try:
            code = int(rc.strip())
        except ValueError:
            return None  # half-written cannot happen (rename), but be safe: look again later
        out = self._tail(f"{job.directory}/stdout")
        err = self._tail(f"{job.directory}/stderr")
        if SIGNAL_BASE < code <= SIGNAL_BASE + 64:
            # sh reports a death by signal N as status 128+N and cannot tell it from exit(128+N).
            return ProcessStatus(running=False, signal=code - SIGNAL_BASE, stdout_tail=out, stderr_tail=err)
        return ProcessStatus(running=False, exit_code=code, stdout_tail=out, stderr_tail=err)

    def _tail(self, guest_path: str) -> bytes:
        host = self._scratch()
        try:
            self._call("CopyFileFromGuestToHost", self.vmx, [guest_path, str(host)], login=self.login)
            with host.open("rb") as f:
                f.seek(max(0, host.stat().st_size - OUTPUT_TAIL))
                return f.read()
        except vr.GuestFileMissing:
            return b""
        finally:
            host.unlink(missing_ok=True)

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
        if self._gi is not None:
            self._gi.copy_to(host_path, guest_path)
            return
        self._call("CopyFileFromHostToGuest", self.vmx, [str(host_path), guest_path], login=self.login)

    def copy_from_guest(self, guest_path: str, host_path: Path, *, max_bytes: int | None = None) -> int:
        """``CopyFileFromGuestToHost`` into a temporary name, size-checked, then renamed.

        vmrun cannot stat a guest file, so a file over ``max_bytes`` is copied, then removed.

        Raises:
            OutputError: the guest file is missing or larger than ``max_bytes``.
        """
        part = host_path.with_name(f".{host_path.name}.part")
        try:
            if self._gi is not None:
                fetched = self._gi.fetch(guest_path)
                if fetched is None:
                    raise OutputError(f"vmware: guest file {guest_path} does not exist")
                shutil.move(fetched, part)
            else:
                try:
                    self._call("CopyFileFromGuestToHost", self.vmx, [guest_path, str(part)], login=self.login)
                except vr.GuestFileMissing as exc:
                    raise OutputError(f"vmware: guest file {guest_path} does not exist") from exc
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
        if self._gi is not None:
            fetched = self._gi.fetch(guest_path)
            if fetched is None:
                return None
            try:
                with fetched.open("rb") as f:
                    return f.read(max_bytes)
            finally:
                fetched.unlink(missing_ok=True)
        host = self._scratch()
        try:
            self._call("CopyFileFromGuestToHost", self.vmx, [guest_path, str(host)], login=self.login)
            with host.open("rb") as f:
                return f.read(max_bytes)
        except vr.GuestFileMissing:
            return None
        finally:
            host.unlink(missing_ok=True)

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

    def snapshot_list(self) -> list[SnapshotInfo]:
        """``vmrun listSnapshots`` (sizes are not reported)."""
        return [SnapshotInfo(n) for n in self._snapshot_names()]

    def snapshot_revert(self, name: str) -> None:
        """``revertToSnapshot``, then start the VM if the revert left it off, then wait for the Tools again.

        Raises:
            SnapshotNotFound: no such snapshot.
        """
        if name not in self._snapshot_names():
            raise vr.SnapshotNotFound(f"vmware: no snapshot named {name!r}")
        self._call("revertToSnapshot", self.vmx, [name], timeout=SNAPSHOT_TIMEOUT)
        self._after_revert()
        if self._tools_seen:
            self.wait_for_tools()

    def snapshot_delete(self, name: str) -> None:
        """``deleteSnapshot`` (its delta is merged, which can take a while).

        Raises:
            SnapshotNotFound: no such snapshot.
        """
        if name not in self._snapshot_names():
            raise vr.SnapshotNotFound(f"vmware: no snapshot named {name!r}")
        self._call("deleteSnapshot", self.vmx, [name], timeout=SNAPSHOT_TIMEOUT)

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
