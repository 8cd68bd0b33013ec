"""One task in one slot: what the wrapper's steps share.

The BOINC client's side (:class:`~boincvm.boinc.api.BoincApp`), the job, the VM behind
its backend, the guest's files, API and program output, the checkpoint record and the status file
run-local reads; and the acts more than one step needs: a phase timed in the status
file, the CPU time claimed, a checkpoint taken and committed, a failure that ends the task.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from boincvm.boinc.api import BoincApp
from boincvm.errors import BoincvmError
from boincvm.hypervisor.base import Backend, GuestProcess
from boincvm.job import CheckpointMode, CpuTimeSource, ResolvedJob
from boincvm.wrapper import app_checkpoint, memory
from boincvm.wrapper.checkpoint import CheckpointRecord, CheckpointStore
from boincvm.wrapper.guest_api_link import GuestApiLink
from boincvm.wrapper.guest_files import GuestFiles
from boincvm.wrapper.guest_output import GuestOutput
from boincvm.wrapper.status import Phase, StatusReport

log = logging.getLogger(__name__)


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


class Task:
    """The state of one task the steps share (see the module docstring).

    Attributes:
        status: what the status file says; written on each change.
        elapsed_before: seconds the task ran before this start (from the checkpoint record).
        last_checkpoint_at: when the last checkpoint was committed (or this start began).
        accel_noted: the host check has logged the accelerator's note already.
    """

    def __init__(self, app: BoincApp, inputs: WrapperInputs, vm: Backend, clock: Callable[[], float]) -> None:
        self.app = app
        self.inputs = inputs
        self.job = job = inputs.job
        self.slot = app.slot_dir
        self.vm = vm
        self.clock = clock
        self.store = CheckpointStore(self.slot)
        self.status = StatusReport()
        self.files = GuestFiles(vm, job)
        self.api = GuestApiLink(self.files, app)  # the guest BOINC API (issue #15)
        self.output = GuestOutput(vm, job.exec_dir, clock)  # the program's output, read as it runs
        self.last_checkpoint_at = clock()
        self.elapsed_before = 0.0
        self.started_at = clock()
        self.accel_noted = False
        self._guest_cpu_start: float | None = None

    @contextlib.contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        """Be in ``phase`` (in the status file) for the block, its time added to the phase's."""
        previous = self.status.phase
        self.enter(phase)
        t0 = self.clock()
        try:
            yield
        finally:
            self.status.timings[phase] = self.status.timings.get(phase, 0.0) + self.clock() - t0
            self.status.phase = previous
            self.write_status()

    def enter(self, phase: Phase) -> None:
        """Be in ``phase`` from now on (in the status file, its ``steps`` included)."""
        self.status.enter(phase)
        self.write_status()

    def write_status(self) -> None:
        """Write the status file (a failure is only logged: only run-local reads it)."""
        try:
            self.status.write(self.slot)
        except OSError as exc:  # only run-local reads it; never fail the job for it
            log.debug("status file: %s", exc)

    def run_cpu(self) -> float:
        """CPU seconds of this run, as the job says they are claimed."""
        if self.job.cpu_time_source is CpuTimeSource.GUEST:
            guest = self.vm.guest_cpu_time()
            if guest is not None:
                if self._guest_cpu_start is None:
                    self._guest_cpu_start = guest
                return max(0.0, guest - self._guest_cpu_start)
        return self.vm.host_cpu_time()

    def fail(self, code: int, message: str) -> int:
        """End the task for good with ``code``: no VM, no checkpoint, the finish file written."""
        log.error("%s", message)
        self.status.message = message
        self.enter(Phase.DONE)
        self.vm.power_off(soft_timeout=0)
        self.store.clear()
        return self.app.finish(int(code), message)

    def checkpoint(self, proc: GuestProcess, record: CheckpointRecord | None) -> CheckpointRecord:
        """Snapshot (or save the program's files), commit, then drop the previous checkpoint;
        the record the slot now has."""
        sequence = (record.sequence if record else 0) + 1
        mode = self.job.checkpoint_mode
        if mode is CheckpointMode.APP:
            name = app_checkpoint.directory_name(sequence)
        else:
            name = f"boincvm-ck{sequence}-{secrets.token_hex(3)}"
        with self.phase(Phase.CHECKPOINT):
            cpu = self.run_cpu()
            if mode is CheckpointMode.APP:
                app_checkpoint.save(self.files, self.slot / name)
            else:
                self.vm.snapshot_create(name)
            elapsed = self.elapsed_before + (self.clock() - self.started_at)
            new = CheckpointRecord(
                snapshot=name,
                guest_pid=proc.pid,
                sequence=sequence,
                cpu_time=cpu,
                elapsed=elapsed,
                checkpoints=(record.checkpoints if record else 0) + 1,
                mode=mode,
                fraction_done=self.status.fraction_done,
            )
            self.store.commit(new)
            if record is not None:
                try:
                    self.drop_checkpoint(record)
                except BoincvmError as exc:  # a stale snapshot only costs disk space
                    log.warning("could not delete snapshot %s: %s", record.snapshot, exc)
        self.app.checkpoint_completed(cpu_time=cpu)
        self.last_checkpoint_at = self.clock()
        self.status.checkpoints = new.checkpoints
        self.write_status()
        log.info("checkpoint %s committed (%d so far)", name, new.checkpoints)
        if mode is CheckpointMode.APP:
            memory.trim()  # the program's files came out through the agent
        return new

    def resume_from(self, record: CheckpointRecord) -> None:
        """Take up the counts ``record`` kept, and tell the client its fraction done at once
        (until the program's files are next read it would see 0, progress going back)."""
        self.status.restored_from = record.snapshot
        self.status.checkpoints = record.checkpoints
        self.status.fraction_done = record.fraction_done
        self.elapsed_before = record.elapsed
        self.app.report(record.fraction_done)

    def drop_checkpoint(self, record: CheckpointRecord) -> None:
        """Delete the snapshot (or the saved files) ``record`` names.

        Raises:
            BoincvmError: the backend could not delete the snapshot.
        """
        if record.mode is CheckpointMode.APP:
            app_checkpoint.drop(self.slot / record.snapshot)
        else:
            self.vm.snapshot_delete(record.snapshot)


__all__ = ["Task", "WrapperInputs"]
