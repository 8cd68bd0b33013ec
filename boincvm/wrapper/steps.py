"""The wrapper's state machine: one workunit in one VM, written against two interfaces.

It speaks to the BOINC client only through :class:`~boincvm.boinc.api.BoincApp` and to
the hypervisor only through :class:`~boincvm.hypervisor.base.Backend`:

1. power the VM up from the app version's image through the slot's overlay;
2. if the workunit has a committed checkpoint, revert to it and go to 4;
3. copy the package and inputs in, install the package, start the program;
4. loop: poll the program, forward fraction done and the credit report, honour
   suspend / resume / quit / abort / a lost client, checkpoint when due (snapshot, then
   commit the checkpoint record atomically, then drop the previous snapshot), honour the
   completion and temporary-exit trigger files;
5. when the program ends: copy the results out, uninstall the package, drop the
   snapshots, report the final CPU time, write the finish file, power off.

Checkpoints are crash-consistent: a checkpoint exists only once ``boincvm_checkpoint.json``
names it (written with fsync and an atomic rename after the snapshot completed), so a
wrapper killed at any instant, even mid-snapshot, resumes from the last committed one.
The wrapper never prints; it logs, and the client keeps its stderr in ``stderr.txt``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from boincvm.boinc.api import BoincApp
from boincvm.boinc.files import TRICKLE_UP_FILE, ExitCode, resolve_filename
from boincvm.errors import (
    BoincvmError,
    GuestError,
    GuestProgramFailed,
    GuestToolsMissing,
    HypervisorError,
    HypervisorUnavailable,
    InputError,
    OutputError,
    OutputMissing,
    PathEscapeError,
    ToolError,
)
from boincvm.hypervisor.base import Backend, GuestProcess, ProcessStatus, VmSpec
from boincvm.job import CheckpointMode, CpuTimeSource, ResolvedJob
from boincvm.names import logical_name_problem
from boincvm.wrapper import guest_api, hostcheck, memory
from boincvm.wrapper.checkpoint import CheckpointRecord, CheckpointStore
from boincvm.wrapper.guest_contract import (
    GuestFileKind,
    Survey,
    Trigger,
    completion_trigger,
    credit_report,
    fraction_done,
    kind_problem,
    kinds_argv,
    ops_bound,
    parse_kinds,
    parse_survey,
    survey_argv,
    temporary_exit_trigger,
)
from boincvm.wrapper.guest_install import install_script, package_guest_path, uninstall_script
from boincvm.wrapper.status import Phase, StatusReport

log = logging.getLogger(__name__)

_Answer = TypeVar("_Answer")

VM_DIR = "boincvm_vm"
#: Seconds between polls of the guest program (and of its progress files).
POLL_PERIOD = 1.0
#: On quit, take a checkpoint first when the last one is older than this.
QUIT_CHECKPOINT_AFTER = 10.0
#: A VM that dies under us: ask the client to restart us after this many seconds.
VM_DIED_RETRY = 120.0
INSTALL_TIMEOUT = 600.0
#: Seconds the main loop sleeps between turns once the program runs (it ticks the BOINC
#: API at each turn: suspend and quit are seen within this).
LOOP_SLEEP = 0.25
#: After this many seconds of the program the state of the program is asked with each
#: survey of its files (every PROGRESS_PERIOD) instead of every POLL_PERIOD: fewer agent
#: calls and wake-ups for the long jobs the wrapper mostly runs.
STEADY_AFTER = 10.0
#: Seconds between reads of the guest's fraction-done and credit files.
PROGRESS_PERIOD = 2.0
#: At most this much of the fraction-done and credit files is read (the last number counts).
PROGRESS_MAX_BYTES = 4096
#: At most this much of a trigger file is read (its first lines count).
TRIGGER_MAX_BYTES = 65536
#: Contract files up to this size come with the guest command that surveys them; larger
#: ones (long trigger messages) are read through the agent.
SURVEY_READ_BYTES = 4096
#: The survey lists at most this many names of the trickle-up directory.
SURVEY_LIST_NAMES = 256
#: Seconds the guest's shell may take to say what the guest files are.
KIND_TIMEOUT = 60.0
#: At most this much of each app-level checkpoint file is copied out.
APP_CHECKPOINT_MAX_BYTES = 1 << 30
#: A program that asks whether to checkpoint gets at least this long to say it is ready.
CHECKPOINT_READY_WAIT = 60.0
#: Seconds a program that wrote ``finish`` or ``temporary_exit`` may take to exit.
PROGRAM_EXIT_WAIT = 30.0


@dataclass(frozen=True)
class WrapperInputs:
    """Everything the wrapper needs, resolved from the slot.

    Attributes:
        job: the complete job (app defaults merged with the workunit's job).
        wu_args: the workunit's command line, as the client passed it, appended in the guest.
        kernel, initrd, image: host paths of the app version's image files.
        package: host path of the guest package, or None.
        inputs: (host path, guest path) of each input file.
        image_files: (name in the VM directory, host path) of each file of a multi-file image.
    """

    job: ResolvedJob
    wu_args: tuple[str, ...]
    kernel: Path | None
    initrd: Path | None
    image: Path | None
    package: Path | None
    inputs: tuple[tuple[Path, str], ...]
    image_files: tuple[tuple[str, Path], ...] = ()


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
        self.job = inputs.job
        self.slot = app.slot_dir
        self.store = CheckpointStore(self.slot)
        self.poll_period = poll_period
        self.clock = clock
        self.status = StatusReport()
        self.spec = VmSpec(
            name=f"boincvm-{secrets.token_hex(4)}",
            workdir=self.slot / VM_DIR,
            image=inputs.image,
            kernel=inputs.kernel,
            initrd=inputs.initrd,
            kernel_cmdline=self.job.kernel_cmdline,
            memory_mb=self.job.memory_size_mb,
            ncpus=self.job.ncpus,
            enable_network=self.job.enable_network,
            boot_timeout=self.job.boot_timeout,
            image_files=dict(inputs.image_files),
            options=_resolve_runtime(dict(self.job.backend_options), self.slot),
        )
        self.vm = backend_factory(self.spec)
        self._guest_cpu_start: float | None = None
        self._last_checkpoint_at = clock()
        self._elapsed_before = 0.0
        self._started_at = clock()
        self._accel_noted = False
        self._notes: dict[str, str] = {}  # the last note logged about each guest file
        # The guest BOINC API (issue #15): its directory, and the pending checkpoint request.
        self._api = self._guest(guest_api.API_DIR)
        self._ck_request: int | None = None
        self._ck_requested_at = 0.0
        self._ck_sequence = 0
        self._uses_checkpoints = False

    # -- small helpers --------------------------------------------------------
    @contextlib.contextmanager
    def _phase(self, phase: Phase) -> Iterator[None]:
        previous = self.status.phase
        self.status.phase = phase.value
        self._write_status()
        t0 = self.clock()
        try:
            yield
        finally:
            self.status.timings[phase.value] = self.status.timings.get(phase.value, 0.0) + self.clock() - t0
            self.status.phase = previous
            self._write_status()

    def _write_status(self) -> None:
        try:
            self.status.write(self.slot)
        except OSError as exc:  # only run-local reads it; never fail the job for it
            log.debug("status file: %s", exc)

    def _run_cpu(self) -> float:
        """CPU seconds of this run, as the job says they are claimed."""
        if self.job.cpu_time_source is CpuTimeSource.GUEST:
            guest = self.vm.guest_cpu_time()
            if guest is not None:
                if self._guest_cpu_start is None:
                    self._guest_cpu_start = guest
                return max(0.0, guest - self._guest_cpu_start)
        return self.vm.host_cpu_time()

    def _guest(self, name: str) -> str:
        return self.job.guest_path(name)

    def _sh(self, script: str, *, timeout: float = 60.0, what: str) -> ProcessStatus:
        status = self.vm.run_program(["/bin/sh", "-c", script], timeout=timeout)
        if not status.succeeded:
            err = (status.stderr_tail or status.stdout_tail).decode("utf-8", "replace").strip()
            raise GuestProgramFailed(f"{what} failed in the guest (exit {status.exit_code}): {err[-300:]}")
        return status

    # -- the run --------------------------------------------------------------
    def run(self) -> int:
        """Run the workunit; return the process exit code (the finish/temporary-exit files are written)."""
        record = self.store.load()
        try:
            try:
                available = type(self.vm).probe()
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
                        proc = self._restore_app(record) if record.mode == "app" else self._restore(record)
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
                        self.store.clear()
                        record = None
                        self.status = StatusReport()
                if proc is None:
                    proc = self._fresh_start()
                return self._main_loop(proc, record)
            except FINAL_ERRORS as exc:
                failure = next(f for f in FAILURES if isinstance(exc, f.errors))
                return self._fail(failure.exit_code, failure.reason(exc))
            except (HypervisorError, GuestError) as exc:
                # The VM died or misbehaved: come back later and resume from the last checkpoint.
                log.error("%s", exc.message)
                self.vm.power_off(soft_timeout=0)
                self.status.message = exc.message
                self._write_status()
                return self.app.temporary_exit(VM_DIED_RETRY, f"VM problem: {exc.message}")
        finally:
            self.vm.power_off(soft_timeout=2.0)

    def _check_host(self) -> int | None:
        """Memory, disk, then KVM (see :mod:`.hostcheck`); the exit code when the task must not start."""
        facts = hostcheck.gather(self.slot)
        need_mem = hostcheck.memory_need_mb(self.job.memory_size_mb, type(self.vm).memory_overhead_mb)
        bound = self.app.init_data.rsc_disk_bound
        used = hostcheck.dir_size_mb(self.spec.workdir)  # a restarted task's overlay counts already
        need_disk = hostcheck.disk_need_mb(self.job.memory_size_mb, bound, used)
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
                return self._fail(decision.exit_code, decision.line)
            if decision.verdict is hostcheck.Verdict.POSTPONE:
                log.error("%s", decision.line)
                self.status.message = decision.line
                self._write_status()
                return self.app.temporary_exit(decision.delay, decision.line, is_notice=decision.notice)
            if decision.line:
                log.warning("%s", decision.line)
                self._accel_noted = True
        return None

    def _fail(self, code: int, message: str) -> int:
        log.error("%s", message)
        self.status.message = message
        self.status.phase = Phase.DONE.value
        self._write_status()
        self.vm.power_off(soft_timeout=0)
        self.store.clear()
        return self.app.finish(int(code), message)

    def _restore(self, record: CheckpointRecord) -> GuestProcess:
        log.info("resuming from checkpoint %s", record.snapshot)
        self.status.restored_from = record.snapshot
        self.status.checkpoints = record.checkpoints
        self._elapsed_before = record.elapsed
        with self._phase(Phase.RESTORE):
            self.vm.power_on(snapshot=record.snapshot)
            self.vm.wait_for_tools()
            # A program blocked in boinc_checkpoint_completed() goes on once the request is gone.
            self._sh(
                f"rm -f {shlex.quote(self._api_file(guest_api.CHECKPOINT_REQUEST))}",
                what="ending the checkpoint request",
            )
        self._note_accel()
        return GuestProcess(pid=record.guest_pid, argv=(self.job.application,))

    def _restore_app(self, record: CheckpointRecord) -> GuestProcess:
        """App-level checkpoint: boot afresh, install, put the program's files back, start it."""
        log.info("resuming from app-level checkpoint %s", record.snapshot)
        saved = self.slot / record.snapshot
        if not saved.is_dir():
            raise GuestError(f"app-level checkpoint {record.snapshot} is missing from the slot")
        self.status.restored_from = record.snapshot
        self.status.checkpoints = record.checkpoints
        self._elapsed_before = record.elapsed
        with self._phase(Phase.RESTORE):
            self.vm.power_on()
            self.vm.wait_for_tools()
            self._install()
            dirs = {os.path.dirname(self._guest(n)) for n in self.job.checkpoint_files}  # noqa: PTH120
            self._sh(
                "mkdir -p " + " ".join(shlex.quote(d) for d in sorted(dirs) if d), what="making directories"
            )
            for i, name in enumerate(self.job.checkpoint_files):
                if (saved / str(i)).is_file():
                    self.vm.copy_to_guest(saved / str(i), self._guest(name))
        self._note_accel()
        return self._start_program()

    def _note_accel(self) -> None:
        note = self.vm.accel_note
        self.status.accel = self.vm.accel_name
        if note and not self._accel_noted:  # the host check has said it already
            log.warning("%s", note)

    def _fresh_start(self) -> GuestProcess:
        with self._phase(Phase.BOOT):
            self.vm.power_on()
            self.vm.wait_for_tools()
        self._note_accel()
        with self._phase(Phase.INSTALL):
            self._install()
        return self._start_program()

    def _start_program(self) -> GuestProcess:
        argv = self._program_argv()
        log.info("starting %s", shlex.join(argv))
        env = dict(self.job.setenv)
        env[guest_api.API_DIR_ENV] = self._api
        proc = self.vm.start_program(argv, env=env or None, cwd=self.job.exec_dir)
        return proc

    def _program_argv(self) -> list[str]:
        fixed = shlex.split(self.job.command_line) if self.job.command_line else []
        return [self.job.application, *fixed, *self.inputs.wu_args]

    def _install(self) -> None:
        exec_dir = self.job.exec_dir
        dirs = {exec_dir} | {os.path.dirname(self._guest(g)) for _, g in self.inputs.inputs}  # noqa: PTH120
        for name in (self.job.fraction_done_filename, self.job.credit_report_filename):
            if name:
                dirs.add(os.path.dirname(self._guest(name)))  # noqa: PTH120
        self._sh(
            "mkdir -p " + " ".join(shlex.quote(d) for d in sorted(dirs) if d), what="making the job directory"
        )
        for host, guest in self.inputs.inputs:
            self.vm.copy_to_guest(host, self._guest(guest))
        if self.inputs.package is not None and self.job.package is not None:
            kind = self.job.package.resolved_kind
            assert kind is not None
            guest_pkg = package_guest_path(kind, exec_dir)
            self.vm.copy_to_guest(self.inputs.package, guest_pkg)
            self._sh(install_script(kind, guest_pkg), timeout=INSTALL_TIMEOUT, what="installing the package")
        self._make_api_dir()

    def _api_file(self, name: str) -> str:
        return f"{self._api}/{name}"

    def _make_api_dir(self) -> None:
        """The guest API's directory (mode 0700) with its ``resolve`` file, before the program starts."""
        names = [(i.open_name, self._guest(i.guest_path)) for i in self.job.input_files]
        names += [(o.open_name, self._guest(o.guest_path)) for o in self.job.output_files]
        text = guest_api.resolve_text(names)
        api = shlex.quote(self._api)
        resolve = shlex.quote(self._api_file(guest_api.RESOLVE))
        self._sh(
            f"rm -rf {api} && mkdir -p -m 0700 {api} && cd {api} && "
            f"mkdir -m 0700 {guest_api.TRICKLE_UP_DIR} {guest_api.TRICKLE_DOWN_DIR} && "
            f"printf %s {shlex.quote(text)} > {resolve}.tmp && mv {resolve}.tmp {resolve}",
            what="making the guest API directory",
        )

    # -- the main loop --------------------------------------------------------
    def _main_loop(self, proc: GuestProcess, record: CheckpointRecord | None) -> int:
        app = self.app
        paused = False
        run_t0 = self.clock()
        memory.trim()  # what copying the package and the inputs in left on the heap
        self.status.phase = Phase.RUN.value
        self._write_status()
        next_poll = 0.0
        next_progress = 0.0
        while True:
            app.tick()
            now = self.clock()
            if app.abort_requested:
                log.info("aborted by the client")
                self.vm.power_off(soft_timeout=0)
                self.store.clear()
                return app.exit_abort()
            if app.client_gone:
                log.warning("the client is gone; stopping the VM")
                self.vm.power_off(soft_timeout=0)
                return app.exit_quit()
            if app.quit_requested:
                log.info("the client asked us to quit; we will resume later")
                if paused:
                    self.vm.resume()
                    paused = False
                if (
                    now - self._last_checkpoint_at > QUIT_CHECKPOINT_AFTER
                    and not self.job.disable_automatic_checkpoints
                    and self.job.checkpoint_mode is CheckpointMode.VM
                    and not self._in_critical_section()
                ):
                    record = self._checkpoint(proc, record)
                self.vm.power_off(soft_timeout=2.0)
                return app.exit_quit()
            if app.suspended and not paused:
                self.vm.pause()
                paused = True
                self.status.phase = Phase.SUSPENDED.value
                self._write_status()
            elif not app.suspended and paused:
                self.vm.resume()
                paused = False
                self.status.phase = Phase.RUN.value
                self._write_status()
            if paused:
                time.sleep(0.2)
                continue
            if now >= next_poll:
                # Poll fast at first (short programs end sooner), then once per poll period.
                # After the first seconds the program's state is due with the survey.
                ran = now - run_t0
                period = self.poll_period if ran < STEADY_AFTER else PROGRESS_PERIOD
                next_poll = now + (0.1 if ran < 2.0 else period)
                status = self.vm.poll_program(proc)
                progress_due = now >= next_progress or not status.running
                checkpoint_wanted = not self.job.disable_automatic_checkpoints and (
                    self._ck_request is not None or self._checkpoint_due(now)
                )
                if progress_due or checkpoint_wanted:
                    # The contract files are looked at every PROGRESS_PERIOD (and at each poll
                    # of a checkpoint handshake); between surveys only the program's state.
                    survey = self._survey(progress=progress_due, triggers=status.running)
                    if progress_due:
                        next_progress = now + PROGRESS_PERIOD
                        self._report_progress(status, survey)
                        self._pass_trickles(survey)
                    ended = self._api_end(survey)
                    if ended is not None:
                        return self._api_ended(proc, ended, record, run_t0)
                    if not status.running:
                        self.status.timings[Phase.RUN.value] = self.clock() - run_t0
                        return self._complete(status, record)
                    trigger = self._check_triggers(survey)
                    if trigger is not None:
                        if trigger.kind == "completion":
                            done = ProcessStatus(running=False, exit_code=trigger.exit_code)
                            return self._complete(done, record, trigger.message)
                        if self.job.checkpoint_mode is CheckpointMode.VM:
                            record = self._checkpoint(proc, record)
                        self.vm.power_off(soft_timeout=2.0)
                        return app.temporary_exit(
                            trigger.delay, trigger.message or "the guest asked for a temporary exit"
                        )
                if self._time_limit_reached(now, run_t0):
                    return self._complete(ProcessStatus(running=False, exit_code=0), record)
                if checkpoint_wanted:
                    record = self._timed_checkpoint(proc, record, survey, now)
            time.sleep(0.05 if now - run_t0 < 2.0 else min(LOOP_SLEEP, self.poll_period))

    def _time_limit_reached(self, now: float, run_t0: float) -> bool:
        limit = self.job.time_limit
        if limit is not None and now - run_t0 + self._elapsed_before > limit:
            log.info("time limit of %g s reached; the job counts as done", limit)
            return True
        return False

    def _checkpoint_due(self, now: float) -> bool:
        if now - self._last_checkpoint_at < self.job.minimum_checkpoint_interval:
            return False
        return self.app.time_to_checkpoint()

    # -- what the guest hands us ---------------------------------------------
    def _note(self, key: str, note: str | None) -> None:
        """Log why a guest file's value was clamped or ignored, once until the reason changes."""
        if note is not None and self._notes.get(key) != note:
            log.warning("%s", note)
        if note is not None:
            self._notes[key] = note

    def _guest_kinds(self, paths: list[str]) -> dict[str, GuestFileKind]:
        """What each guest path is, from the guest's shell, before anything opens one.

        Raises:
            GuestError: the guest's shell did not answer as the script prints.
        """
        if not paths:
            return {}
        return self._ask_shell(kinds_argv(self.job.exec_dir, paths), lambda out: parse_kinds(out, paths))

    def _ask_shell(self, argv: list[str], parse: Callable[[bytes], _Answer | None]) -> _Answer:
        """Run one of the guest_contract scripts and parse what it printed.

        Raises:
            GuestError: it failed, or its output does not fit.
        """
        status = self.vm.run_program(argv, timeout=KIND_TIMEOUT)
        answer = parse(status.stdout_tail) if status.succeeded else None
        if answer is None:
            err = (status.stderr_tail or status.stdout_tail).decode("utf-8", "replace").strip()
            raise GuestError(
                f"the guest's shell could not say what the job's files are (exit {status.exit_code}): "
                f"{err[-300:]}"
            )
        return answer

    def _survey(self, *, progress: bool, triggers: bool) -> Survey:
        """The contract files due for reading now, surveyed in one guest command: each
        one's kind and, for the small regular ones, their contents (:data:`SURVEY_SCRIPT`)."""
        read = []
        if progress:
            read += [self.job.fraction_done_filename, self.job.credit_report_filename]
        if triggers:
            read += [self.job.completion_trigger_file, self.job.temporary_exit_trigger_file]
        api = (guest_api.STATUS, guest_api.CHECKPOINT_READY, guest_api.FINISH, guest_api.TEMPORARY_EXIT)
        read += [self._api_file(n) for n in api]
        entries = {self._guest(n): SURVEY_READ_BYTES + 1 for n in read if n}
        entries[self._guest(self._api_file(guest_api.CRITICAL))] = 0
        entries[self._guest(self._api_file(guest_api.TRICKLE_UP_DIR))] = SURVEY_LIST_NAMES
        paths = sorted(entries)
        if not paths:
            return Survey({}, {})
        token = "boincvm-" + secrets.token_hex(8)
        argv = survey_argv(self.job.exec_dir, token, [(p, entries[p]) for p in paths])
        return self._ask_shell(argv, lambda out: parse_survey(out, token, paths))

    def _read_contract_file(
        self, name: str | None, what: str, survey: Survey, max_bytes: int
    ) -> bytes | None:
        """A contract file's first ``max_bytes``, or None when it is absent or not a regular file."""
        if not name:
            return None
        path = self._guest(name)
        kind = survey.kind(path)
        if problem := kind_problem(kind):
            self._note(what, f"the {what} file {path} {problem}; ignored")
            return None
        if kind is not GuestFileKind.FILE:
            return None
        data = survey.data.get(path)
        if data is not None and len(data) <= SURVEY_READ_BYTES:
            return data[:max_bytes]
        return self.vm.read_guest_file(path, max_bytes=max_bytes)  # larger, or no ``head`` in the guest

    def _report_progress(self, status: ProcessStatus, survey: Survey) -> None:
        fraction: float | None = None
        ops: float | None = None
        job = self.job
        data = self._read_contract_file(
            job.fraction_done_filename, "fraction done", survey, PROGRESS_MAX_BYTES
        )
        if data is not None:
            got = fraction_done(data, f"fraction done file {job.fraction_done_filename}:")
            self._note("fraction done", got.note)
            fraction = got.value
        cpu = self._run_cpu()
        data = self._read_contract_file(
            job.credit_report_filename, "credit report", survey, PROGRESS_MAX_BYTES
        )
        if data is not None:
            init = self.app.init_data
            bound = ops_bound(
                rsc_fpops_bound=init.rsc_fpops_bound,
                p_fpops=init.host_info.p_fpops,
                cpu_time=init.wu_cpu_time + cpu,
            )
            got = credit_report(data, bound, f"credit report file {job.credit_report_filename}:")
            self._note("credit report", got.note)
            ops = got.value
        data = self._read_contract_file(
            self._api_file(guest_api.STATUS), "guest API status", survey, guest_api.STATUS_MAX_BYTES
        )
        if data is not None:
            init = self.app.init_data
            limit = ops_bound(
                rsc_fpops_bound=init.rsc_fpops_bound,
                p_fpops=init.host_info.p_fpops,
                cpu_time=init.wu_cpu_time + cpu,
            )
            api = guest_api.parse_status(data, limit)
            self._note("status fraction", api.fraction.note)
            self._note("status operations", api.ops.note)
            fraction = api.fraction.value if api.fraction.value is not None else fraction
            ops = api.ops.value if api.ops.value is not None else ops
            self._uses_checkpoints = self._uses_checkpoints or api.uses_checkpoints
        self.app.report(fraction, cpu_time=cpu, fpops_cumulative=ops)
        if fraction is not None:
            self.status.fraction_done = fraction
        self.status.cpu_time = self.app.last_status.current_cpu_time
        tail = (status.stdout_tail or status.stderr_tail)[-200:].decode("utf-8", "replace").strip()
        if tail:
            self.status.last_output = tail.splitlines()[-1]
        self._write_status()

    def _check_triggers(self, survey: Survey) -> Trigger | None:
        for kind, name in (
            ("completion", self.job.completion_trigger_file),
            ("temporary_exit", self.job.temporary_exit_trigger_file),
        ):
            what = kind.replace("_", "-") + " trigger"
            data = self._read_contract_file(name, what, survey, TRIGGER_MAX_BYTES)
            if data is None or name is None:
                continue
            with contextlib.suppress(GuestError):
                self.vm.run_program(["/bin/rm", "-f", self._guest(name)], timeout=30)
            parse = completion_trigger if kind == "completion" else temporary_exit_trigger
            trigger = parse(data, f"{what} file {name}:")
            self._note(what, trigger.note)
            return trigger
        return None

    def _checkpoint(self, proc: GuestProcess, record: CheckpointRecord | None) -> CheckpointRecord | None:
        """Snapshot, commit, then drop the previous snapshot; the record the slot now has."""
        sequence = (record.sequence if record else 0) + 1
        name = f"boincvm-ck{sequence}-{secrets.token_hex(3)}"
        app_mode = self.job.checkpoint_mode is CheckpointMode.APP
        if app_mode:
            name = f"boincvm_appck{sequence}"
        with self._phase(Phase.CHECKPOINT):
            cpu = self._run_cpu()
            if app_mode:
                self._save_app_files(self.slot / name)
            else:
                self.vm.snapshot_create(name)
            elapsed = self._elapsed_before + (self.clock() - self._started_at)
            new = CheckpointRecord(
                snapshot=name,
                guest_pid=proc.pid,
                sequence=sequence,
                cpu_time=cpu,
                elapsed=elapsed,
                checkpoints=(record.checkpoints if record else 0) + 1,
                mode=self.job.checkpoint_mode.value,
            )
            self.store.commit(new)
            if record is not None:
                try:
                    self._drop_checkpoint(record)
                except BoincvmError as exc:  # a stale snapshot only costs disk space
                    log.warning("could not delete snapshot %s: %s", record.snapshot, exc)
        self.app.checkpoint_completed(cpu_time=cpu)
        self._last_checkpoint_at = self.clock()
        self.status.checkpoints = new.checkpoints
        self._write_status()
        log.info("checkpoint %s committed (%d so far)", name, new.checkpoints)
        if app_mode:
            memory.trim()  # the program's files came out through the agent
        return new

    def _drop_checkpoint(self, record: CheckpointRecord) -> None:
        if record.mode == "app":
            shutil.rmtree(self.slot / record.snapshot, ignore_errors=True)
        else:
            self.vm.snapshot_delete(record.snapshot)

    def _save_app_files(self, target: Path) -> None:
        """Copy the program's checkpoint files out to ``target`` durably (each file written
        and fsynced under a temporary name, the directory renamed into place and fsynced);
        the record naming it is committed only after this returns."""
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        tmp.mkdir()
        names = self.job.checkpoint_files
        kinds = self._guest_kinds(sorted({self._guest(n) for n in names}))
        for i, name in enumerate(names):
            guest = self._guest(name)
            kind = kinds.get(guest, GuestFileKind.MISSING)
            if kind is GuestFileKind.MISSING:
                continue  # not written yet: the restart goes without it, as the program would
            if problem := kind_problem(kind):
                raise GuestError(f"checkpoint file {name}: guest file {guest} {problem}")
            self.vm.copy_from_guest(guest, tmp / str(i), max_bytes=APP_CHECKPOINT_MAX_BYTES)
            fd = os.open(tmp / str(i), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        tmp.replace(target)
        fd = os.open(self.slot, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- the guest BOINC API (issue #15) ---------------------------------------
    def _in_critical_section(self) -> bool:
        """Whether the program is inside a critical section now (``critical`` exists)."""
        path = self._api_file(guest_api.CRITICAL)
        return self._guest_kinds([path]).get(path, GuestFileKind.MISSING) is not GuestFileKind.MISSING

    def _write_api_file(self, name: str, text: str) -> None:
        path = shlex.quote(self._api_file(name))
        self._sh(
            f"printf %s {shlex.quote(text)} > {path}.tmp && mv {path}.tmp {path}", what=f"writing {name}"
        )

    def _timed_checkpoint(
        self, proc: GuestProcess, record: CheckpointRecord | None, survey: Survey, now: float
    ) -> CheckpointRecord | None:
        """A checkpoint timed by the program: ask (``checkpoint_request``), then snapshot once
        it says it is ready, or at once when it never asks whether to checkpoint, or when it
        has not answered in time; never while it is in a critical section."""
        ready: int | None = None
        if self._ck_request is None:
            self._ck_sequence += 1
            self._ck_request = self._ck_sequence
            self._ck_requested_at = now
            self._write_api_file(guest_api.CHECKPOINT_REQUEST, f"{self._ck_request}\n")
            if self._uses_checkpoints:
                return record  # the program answers at its next boinc_time_to_checkpoint()
        else:
            data = self._read_contract_file(
                self._api_file(guest_api.CHECKPOINT_READY), "checkpoint ready", survey, 64
            )
            ready = guest_api.sequence_of(data)
        if survey.kind(self._api_file(guest_api.CRITICAL)) is not GuestFileKind.MISSING:
            return record  # inside a critical section: try at the next poll
        if self.job.checkpoint_mode is CheckpointMode.APP and ready != self._ck_request:
            return record  # the program's files are consistent only at its checkpoint_ready
        wait = max(CHECKPOINT_READY_WAIT, self.app.init_data.effective_checkpoint_period)
        if ready != self._ck_request and self._uses_checkpoints and now - self._ck_requested_at < wait:
            return record
        if ready != self._ck_request:
            if self._uses_checkpoints:
                log.info(
                    "the program did not say it is ready to checkpoint within %g s; snapshotting now", wait
                )
            if self._in_critical_section():
                return record
        if ready == self._ck_request:
            log.info("checkpoint %d at the program's checkpoint_ready", ready)
        record = self._checkpoint(proc, record)
        self._ck_request = None
        self._sh(
            f"rm -f {shlex.quote(self._api_file(guest_api.CHECKPOINT_REQUEST))}",
            what="ending the checkpoint request",
        )
        return record

    def _api_end(self, survey: Survey) -> Trigger | None:
        """The program's ``finish`` or ``temporary_exit`` file, read and parsed, or None."""
        data = self._read_contract_file(self._api_file(guest_api.FINISH), "finish", survey, TRIGGER_MAX_BYTES)
        if data is not None:
            trigger = guest_api.parse_finish(data)
        else:
            data = self._read_contract_file(
                self._api_file(guest_api.TEMPORARY_EXIT), "temporary exit", survey, TRIGGER_MAX_BYTES
            )
            if data is None:
                return None
            trigger = temporary_exit_trigger(data, "temporary exit file:")
        self._note(trigger.kind, trigger.note)
        return trigger

    def _api_ended(
        self, proc: GuestProcess, trigger: Trigger, record: CheckpointRecord | None, run_t0: float
    ) -> int:
        """End the task as the program's ``boinc_finish`` or ``boinc_temporary_exit`` asked."""
        # The library exits right after writing the file; C's stdio flushes the outputs at
        # exit, so the results are copied only once the program has ended.
        deadline = self.clock() + PROGRAM_EXIT_WAIT
        status = self.vm.poll_program(proc)
        while status.running and self.clock() < deadline:
            time.sleep(0.1)
            status = self.vm.poll_program(proc)
        self.status.timings[Phase.RUN.value] = self.clock() - run_t0
        survey = self._survey(progress=True, triggers=False)
        self._report_progress(status, survey)  # the final fraction done and operations
        self._pass_trickles(survey)
        if trigger.kind == "temporary_exit":
            # No snapshot here: the program is exiting; the next start resumes from the last one.
            self.vm.power_off(soft_timeout=2.0)
            reason = trigger.message or "the guest program asked for a temporary exit"
            return self.app.temporary_exit(trigger.delay, reason, is_notice=trigger.is_notice)
        if trigger.exit_code != 0:
            return self._fail(trigger.exit_code, trigger.message or f"boinc_finish({trigger.exit_code})")
        done = ProcessStatus(
            running=False, exit_code=0, stdout_tail=status.stdout_tail, stderr_tail=status.stderr_tail
        )
        return self._complete(done, record, trigger.message)

    def _pass_trickles(self, survey: Survey) -> None:
        """Trickle-up messages from the guest to the client (one at a time, as BOINC's API
        keeps one ``trickle_up.xml``), and the client's trickle-down files into the guest."""
        for down in sorted(self.slot.glob("trickle_down*")):
            if down.is_file():
                self.vm.copy_to_guest(down, f"{self._api_file(guest_api.TRICKLE_DOWN_DIR)}/{down.name}")
                down.unlink()
                log.info("trickle-down %s passed to the guest", down.name)
        updir = self._api_file(guest_api.TRICKLE_UP_DIR)
        if survey.kind(updir) is not GuestFileKind.DIRECTORY or (self.slot / TRICKLE_UP_FILE).exists():
            return
        listing = survey.data.get(updir)
        if listing is None:  # the survey lists it; ``ls`` only if that did not work
            listing = self.vm.run_program(["/bin/ls", "-1", updir], timeout=KIND_TIMEOUT).stdout_tail
        names = guest_api.trickle_names(listing)[:1]
        paths = [f"{updir}/{n}" for n in names]
        for path, kind in self._guest_kinds(paths).items():
            data = (
                self.vm.read_guest_file(path, max_bytes=guest_api.TRICKLE_MAX_BYTES)
                if kind is GuestFileKind.FILE
                else None
            )
            self._sh(f"rm -f {shlex.quote(path)}", what="taking a trickle-up message")
            got = guest_api.parse_trickle(data) if data is not None else None
            if got is None:
                self._note(
                    "trickle", f"trickle-up message {path} is not a regular file with a variety; dropped"
                )
                continue
            self.app.send_trickle_up(*got)
            log.info(
                "trickle-up %s (variety %s, %d bytes) sent", path.rsplit("/", 1)[-1], got[0], len(got[1])
            )

    # -- the end --------------------------------------------------------------
    def _complete(self, status: ProcessStatus, record: CheckpointRecord | None, message: str = "") -> int:
        out = (status.stdout_tail + status.stderr_tail).decode("utf-8", "replace").strip()
        if out:
            log.info("guest program output (tail):\n%s", out[-2000:])
        if status.exit_code != 0 or status.signal is not None:
            what = f"signal {status.signal}" if status.signal is not None else f"code {status.exit_code}"
            return self._fail(ExitCode.CHILD_FAILED, message or f"the guest program exited with {what}")
        with self._phase(Phase.COPY_OUT):
            self._copy_out()
        with self._phase(Phase.CLEANUP):
            self._cleanup(record)
        cpu = self._run_cpu()
        self.app.report(1.0, cpu_time=cpu)
        self.status.cpu_time = self.app.last_status.current_cpu_time
        self.status.fraction_done = 1.0
        self.status.phase = Phase.DONE.value
        self._write_status()
        self.vm.power_off(soft_timeout=2.0)
        self.store.clear()
        return self.app.finish(0, message or None)

    def _copy_out(self) -> None:
        # One look at every output first: copying a FIFO, a device or a symlink out of the
        # job's directory would hang the guest agent or read what the job does not own.
        kinds = self._guest_kinds(sorted({self._guest(o.guest_path) for o in self.job.output_files}))
        for out in self.job.output_files:
            target = self.app.resolve(out.open_name)
            project = Path(self.app.init_data.project_dir) if self.app.init_data.project_dir else None
            _check_inside(target, (self.slot, project))
            guest = self._guest(out.guest_path)
            if problem := kind_problem(kinds.get(guest, GuestFileKind.MISSING)):
                raise OutputError(
                    f"output {out.open_name}: guest file {guest} {problem}",
                    hint="the program must leave each output as a regular file inside the job's directory",
                )
            part = self.slot / f".boincvm-{out.open_name}.part"
            try:
                self.vm.copy_from_guest(guest, part, max_bytes=out.max_nbytes)
            except OutputMissing as exc:
                part.unlink(missing_ok=True)
                if out.optional:
                    log.info("optional output %s is absent", out.open_name)
                    continue
                raise OutputMissing(f"output {out.open_name}: {exc.message}") from exc
            except OutputError as exc:
                part.unlink(missing_ok=True)
                raise OutputError(f"output {out.open_name}: {exc.message}") from exc
            part.replace(target)
            log.info("output %s: %d bytes", out.open_name, target.stat().st_size)

    def _cleanup(self, record: CheckpointRecord | None) -> None:
        if self.inputs.package is not None and self.job.package is not None:
            kind = self.job.package.resolved_kind
            assert kind is not None
            try:
                self._sh(
                    uninstall_script(kind, self.job.exec_dir), timeout=120, what="uninstalling the package"
                )
            except BoincvmError as exc:
                log.warning("%s", exc.message)
        if record is not None:
            with contextlib.suppress(BoincvmError):
                self._drop_checkpoint(record)


def _check_inside(path: Path, roots: Sequence[Path | None]) -> None:
    real = path.resolve()
    for root in roots:
        if root is not None and real.is_relative_to(root.resolve()):
            return
    raise PathEscapeError(f"output path {path} resolves outside the slot and project directories")


__all__ = ["FAILURES", "Failure", "Wrapper", "WrapperInputs"]


def _resolve_runtime(options: dict[str, str], slot: Path) -> dict[str, str]:
    """``options`` with the QEMU ``runtime`` option's logical name (an app-version file the
    slot links to) replaced by the file it names, in the project directory.

    Raises:
        InputError: the name is not a plain logical name.
    """
    name = options.get("runtime")
    if not name:
        return options
    problem = logical_name_problem(name)
    if problem:
        raise InputError(f"backend option runtime: {problem}")
    return {**options, "runtime": str(resolve_filename(name, slot).resolve())}
