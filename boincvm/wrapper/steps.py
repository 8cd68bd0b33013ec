"""The wrapper's state machine: one workunit in one VM, written against two interfaces.

It speaks to the BOINC client only through :class:`~boincvm.boinc.api.BoincApp` and to
the hypervisor only through :class:`~boincvm.hypervisor.base.Backend`:

1. power the VM up from the app version's image through the slot's overlay;
2. if the workunit has a committed checkpoint, revert to it and go to 4;
3. copy the package and inputs in, install the package, start the program;
4. loop (:mod:`.run_loop`): poll the program, forward fraction done and the credit report,
   honour suspend / resume / quit / abort / a lost client, checkpoint when due (snapshot,
   then commit the checkpoint record atomically, then drop the previous snapshot), honour
   the completion and temporary-exit trigger files and the guest API's (:mod:`.guest_api_link`);
5. when the program ends (:mod:`.finish`): copy the results out, uninstall the package,
   drop the snapshots, report the final CPU time, write the finish file, power off.

This module holds steps 1 to 3 and maps errors to how the task ends; :mod:`.task` is what
the steps share. Checkpoints are crash-consistent: a checkpoint exists only once
``boincvm_checkpoint.json`` names it (written with fsync and an atomic rename after the
snapshot completed), so a wrapper killed at any instant, even mid-snapshot, resumes from
the last committed one (app-level checkpoints: :mod:`.app_checkpoint`). The wrapper never
prints; it logs, and the client keeps its stderr in ``stderr.txt``.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

from boincvm.boinc.api import BoincApp
from boincvm.boinc.files import ExitCode
from boincvm.errors import (
    BoincvmError,
    GuestError,
    GuestProgramFailed,
    GuestToolsMissing,
    HypervisorError,
    HypervisorUnavailable,
    InputError,
    OutputError,
    PathEscapeError,
    ToolError,
)
from boincvm.hypervisor.base import Backend, GuestProcess, VmSpec
from boincvm.job import CheckpointMode
from boincvm.wrapper import app_checkpoint, hostcheck
from boincvm.wrapper.checkpoint import CheckpointRecord
from boincvm.wrapper.guest_install import install_script, package_guest_path
from boincvm.wrapper.run_loop import PROGRESS_PERIOD, STEADY_AFTER, MainLoop
from boincvm.wrapper.status import Phase, StatusReport
from boincvm.wrapper.task import Task, WrapperInputs

log = logging.getLogger(__name__)

VM_DIR = "boincvm_vm"
#: Seconds between polls of the guest program (and of its progress files).
POLL_PERIOD = 1.0
#: A VM that dies under us: ask the client to restart us after this many seconds.
VM_DIED_RETRY = 120.0
INSTALL_TIMEOUT = 600.0

BackendFactory = Callable[[VmSpec], Backend]


@dataclass(frozen=True)
class Failure:
    """How an error ends the task: the exit code the client reports, and the reason given."""

    errors: tuple[type[BoincvmError], ...]
    exit_code: ExitCode
    tell_hint: bool = False

    def reason(self, exc: BoincvmError) -> str:
        """The reason written to the finish file (with the hint where it says what to do)."""
        return exc.message + (f" ({exc.hint})" if self.tell_hint and exc.hint else "")


#: The errors that end the task for good, most specific first (the first that matches counts).
#: Any other HypervisorError or GuestError is a VM that died or misbehaved: a temporary exit,
#: and the next start resumes from the last checkpoint.
FAILURES: tuple[Failure, ...] = (
    Failure((HypervisorUnavailable,), ExitCode.INIT_FAILURE, tell_hint=True),
    Failure((GuestToolsMissing,), ExitCode.INIT_FAILURE),
    Failure((InputError, PathEscapeError), ExitCode.INIT_FAILURE),
    Failure((OutputError, GuestProgramFailed), ExitCode.CHILD_FAILED),
    Failure((ToolError,), ExitCode.INIT_FAILURE, tell_hint=True),
)
FINAL_ERRORS: tuple[type[BoincvmError], ...] = tuple(e for f in FAILURES for e in f.errors)


class Wrapper:
    """Runs one workunit to an exit code. See the module docstring for the steps."""

    def __init__(
        self,
        app: BoincApp,
        inputs: WrapperInputs,
        backend_factory: BackendFactory,
        *,
        poll_period: float = POLL_PERIOD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.inputs = inputs
        self.job = job = inputs.job
        self.slot = app.slot_dir
        self.poll_period = poll_period
        self.spec = VmSpec(
            name=f"boincvm-{secrets.token_hex(4)}",
            workdir=self.slot / VM_DIR,
            image=inputs.image,
            kernel=inputs.kernel,
            initrd=inputs.initrd,
            kernel_cmdline=job.kernel_cmdline,
            memory_mb=job.memory_mb,
            ncpus=job.ncpus,
            enable_network=job.enable_network,
            boot_timeout=job.boot_timeout,
            image_files=dict(inputs.image_files),
            options=dict(job.backend_options),
            resolve_file=self.app.resolve,
        )
        self.vm = backend_factory(self.spec)
        self.task = Task(app, inputs, self.vm, clock)

    # -- the run --------------------------------------------------------------
    def run(self) -> int:
        """Run the workunit; return the process exit code (the finish/temporary-exit files are written)."""
        record = self.task.store.load()
        try:
            try:
                available = self.vm.availability()
                if not available.ok:
                    raise HypervisorUnavailable(
                        f"{self.vm.kind}: {available.reason}", hint=available.detail or None
                    )
                checked = self._check_host()
                if checked is not None:
                    return checked
                proc = None
                if record is not None:
                    try:
                        proc = (
                            self._restore_app(record)
                            if record.mode is CheckpointMode.APP
                            else self._restore(record)
                        )
                    except (HypervisorError, GuestError) as exc:
                        if isinstance(exc, HypervisorUnavailable):
                            raise
                        # A checkpoint that cannot be restored must not wedge the task for good
                        # (vboxwrapper's users lost whole tasks that way): start afresh instead.
                        log.error(
                            "checkpoint %s cannot be restored (%s); starting the job afresh",
                            record.snapshot,
                            exc.message,
                        )
                        self.vm.power_off(soft_timeout=0)
                        self.task.store.clear()
                        record = None
                        self.task.status = StatusReport()
                        self.app.report(0.0)  # the checkpoint's fraction no longer holds
                if proc is None:
                    proc = self._fresh_start()
                return MainLoop(self.task, self.poll_period).run(proc, record)
            except FINAL_ERRORS as exc:
                failure = next(f for f in FAILURES if isinstance(exc, f.errors))
                return self.task.fail(failure.exit_code, failure.reason(exc))
            except (HypervisorError, GuestError) as exc:
                return self._come_back_later(exc.message)
            except OSError as exc:  # a write of the wrapper's own in the slot
                if exc.errno not in hostcheck.DISK_FULL_ERRNOS:
                    raise
                return self._come_back_later(f"{exc.filename or 'a file'}: {exc.strerror}", disk_full=True)
        finally:
            self.vm.power_off(soft_timeout=2.0)

    def _come_back_later(self, message: str, *, disk_full: bool = False) -> int:
        """The VM died or misbehaved, or the disk is full: stop the VM and exit for a while;
        the next start resumes from the last checkpoint."""
        log.error("%s", message)
        self.vm.power_off(soft_timeout=0)
        full = hostcheck.check_disk_after_failure(self.slot, self.job.memory_mb, message, full=disk_full)
        line, delay = (full.line, full.delay) if full.delay else (f"VM problem: {message}", VM_DIED_RETRY)
        if full.delay:
            log.error("%s", line)
        self.task.status.message = line
        self.task.write_status()
        return self.app.temporary_exit(delay, line)

    def _check_host(self) -> int | None:
        """Memory, disk, then KVM (see :mod:`.hostcheck`); the exit code when the task must not start."""
        facts = hostcheck.gather(self.slot)
        need_mem = hostcheck.memory_need_mb(self.job.memory_mb, type(self.vm).memory_overhead_mb)
        bound = self.app.init_data.rsc_disk_bound
        used = hostcheck.dir_size_mb(self.spec.workdir)  # a restarted task's overlay counts already
        need_disk = hostcheck.disk_need_mb(self.job.memory_mb, bound, used)
        checks: tuple[Callable[[], hostcheck.Decision], ...] = (
            lambda: hostcheck.check_memory(need_mem, facts),
            lambda: hostcheck.check_disk(need_disk, facts),
            # Last: the KVM probe may run a short trial boot, which a refused job never pays.
            lambda: hostcheck.check_accel(self.vm.check_accel(), required=self.job.vm_accel_required),
        )
        for decide in checks:
            decision = decide()
            if decision.verdict is hostcheck.Verdict.REFUSE:
                assert decision.exit_code is not None
                return self.task.fail(decision.exit_code, decision.line)
            if decision.verdict is hostcheck.Verdict.POSTPONE:
                log.error("%s", decision.line)
                self.task.status.message = decision.line
                self.task.write_status()
                return self.app.temporary_exit(decision.delay, decision.line, is_notice=decision.notice)
            if decision.line:
                log.warning("%s", decision.line)
                self.task.accel_noted = True
        return None

    def _restore(self, record: CheckpointRecord) -> GuestProcess:
        log.info("resuming from checkpoint %s", record.snapshot)
        self.task.resume_from(record)
        with self.task.phase(Phase.RESTORE):
            self.vm.power_on(snapshot=record.snapshot)
            self.vm.wait_for_tools()
            # A program blocked in boinc_checkpoint_completed() goes on once the request is gone.
            self.task.api.end_checkpoint_request()
        self._note_accel()
        return GuestProcess(pid=record.guest_pid, argv=(self.job.application,))

    def _restore_app(self, record: CheckpointRecord) -> GuestProcess:
        """App-level checkpoint: boot afresh, install, put the program's files back, start it."""
        log.info("resuming from app-level checkpoint %s", record.snapshot)
        saved = self.slot / record.snapshot
        if not saved.is_dir():
            raise GuestError(f"app-level checkpoint {record.snapshot} is missing from the slot")
        self.task.resume_from(record)
        with self.task.phase(Phase.RESTORE):
            self.vm.power_on()
            self.vm.wait_for_tools()
            self._install()
            app_checkpoint.put_back(self.task.files, saved)
        self._note_accel()
        return self._start_program()

    def _note_accel(self) -> None:
        note = self.vm.accel_note
        self.task.status.accel = self.vm.accel_name
        if note and not self.task.accel_noted:  # the host check has said it already
            log.warning("%s", note)

    def _fresh_start(self) -> GuestProcess:
        with self.task.phase(Phase.BOOT):
            self.vm.power_on()
            self.vm.wait_for_tools()
        self._note_accel()
        with self.task.phase(Phase.INSTALL):
            self._install()
        return self._start_program()

    def _start_program(self) -> GuestProcess:
        argv = self._program_argv()
        log.info("starting %s", shlex.join(argv))
        env = dict(self.job.setenv) | self.task.api.environment()
        # Its output goes to a file the progress surveys read as it runs (:mod:`.guest_output`).
        launch = self.task.output.launch_argv(argv)
        return self.vm.start_program(launch, env=env or None, cwd=self.job.exec_dir)

    def _program_argv(self) -> list[str]:
        fixed = shlex.split(self.job.command_line) if self.job.command_line else []
        return [self.job.application, *fixed, *self.inputs.wu_args]

    def _install(self) -> None:
        exec_dir = self.job.exec_dir
        dirs = {exec_dir} | {os.path.dirname(self.task.files.path(g)) for _, g in self.inputs.inputs}  # noqa: PTH120
        dirs.add(os.path.dirname(self.task.output.path))  # noqa: PTH120 - the launcher then forks no mkdir
        for name in (self.job.fraction_done_filename, self.job.credit_report_filename):
            if name:
                dirs.add(os.path.dirname(self.task.files.path(name)))  # noqa: PTH120
        # One guest command before the inputs: the job's directories and the guest API's
        # (under TCG each guest command costs 30-100 ms just after a restore).
        mkdir = "mkdir -p " + " ".join(shlex.quote(d) for d in sorted(dirs) if d)
        self.task.files.sh(f"{mkdir} && {self.task.api.dir_script()}", what="making the job directory")
        for host, guest in self.inputs.inputs:
            self.vm.copy_to_guest(host, self.task.files.path(guest))
        if self.inputs.package is not None and self.job.package is not None:
            kind = self.job.package.resolved_kind
            assert kind is not None
            guest_pkg = package_guest_path(kind, exec_dir)
            self.vm.copy_to_guest(self.inputs.package, guest_pkg)
            self.task.files.sh(
                install_script(kind, guest_pkg), timeout=INSTALL_TIMEOUT, what="installing the package"
            )


__all__ = [
    "FAILURES",
    "PROGRESS_PERIOD",
    "STEADY_AFTER",
    "VM_DIR",
    "Failure",
    "Wrapper",
    "WrapperInputs",
]
