"""Step 5: the program has ended well: copy the results out, uninstall the package, drop
the checkpoints, report the final CPU time, write the finish file, power off.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from boincvm.boinc.files import ExitCode
from boincvm.errors import BoincvmError, OutputError, OutputMissing, PathEscapeError
from boincvm.hypervisor.base import ProcessStatus
from boincvm.wrapper.checkpoint import CheckpointRecord
from boincvm.wrapper.guest_contract import GuestFileKind, Survey, kind_problem
from boincvm.wrapper.guest_install import uninstall_script
from boincvm.wrapper.guest_output import from_line_start
from boincvm.wrapper.status import Phase
from boincvm.wrapper.task import Task

log = logging.getLogger(__name__)

#: Characters of the guest program's output the wrapper logs at the end (into the task's stderr.txt).
OUTPUT_TAIL_CHARS = 2000


def complete(
    task: Task,
    status: ProcessStatus,
    record: CheckpointRecord | None,
    message: str = "",
    *,
    survey: Survey | None = None,
) -> int:
    """End the task as the program's ``status`` says; the process exit code. ``survey``: the
    last survey, made after the program ended, with the outputs' kinds in it.

    Raises:
        OutputError: an output is not a regular file in the job's directory, or too large.
        OutputMissing: a required output is missing.
        PathEscapeError: an output's slot name resolves outside the slot and project.
    """
    out = output_tail(*task.output.final(status))  # the end of the output file the last survey read
    if out:
        log.info("guest program output (tail):\n%s", out)
    if status.exit_code != 0 or status.signal is not None:
        what = f"signal {status.signal}" if status.signal is not None else f"code {status.exit_code}"
        return task.fail(ExitCode.CHILD_FAILED, message or f"the guest program exited with {what}")
    with task.phase(Phase.COPY_OUT):
        _copy_out(task, survey)
    with task.phase(Phase.CLEANUP):
        _cleanup(task, record)
    cpu = task.run_cpu()
    task.app.report(1.0, cpu_time=cpu)
    task.status.cpu_time = task.app.last_status.current_cpu_time
    task.status.fraction_done = 1.0
    task.enter(Phase.DONE)
    # Nothing of the VM is kept: no quit, whose flush of the throw-away overlay only costs
    # time (0.1 s after 100 MB of outputs).
    task.vm.power_off(soft_timeout=0)
    task.store.clear()
    return task.app.finish(0, message or None)


def output_tail(stdout: bytes, stderr: bytes, limit: int = OUTPUT_TAIL_CHARS) -> str:
    """The end of the program's output (stdout, then stderr), at most ``limit`` characters,
    starting at the start of a line: the first line a cut would split is left out whole,
    unless it is the only one, whose end is then kept after ``...``."""
    parts = [p.decode("utf-8", "replace").strip("\n") for p in (stdout, stderr)]
    text = "\n".join(p for p in parts if p.strip()).rstrip()
    return text.lstrip("\n") if len(text) <= limit else from_line_start(text, limit)


def _copy_out(task: Task, survey: Survey | None) -> None:
    app, job, files = task.app, task.job, task.files
    # One look at every output first: copying a FIFO, a device or a symlink out of the
    # job's directory would hang the guest agent or read what the job does not own. The
    # last survey, made after the program ended, looked already when it was asked to.
    paths = sorted({files.path(o.guest_path) for o in job.output_files})
    if survey is not None and all(p in survey.kinds for p in paths):
        kinds = {p: survey.kind(p) for p in paths}
    else:
        kinds = files.kinds(paths)
    for out in job.output_files:
        target = app.resolve(out.open_name)
        _check_inside(target, (task.slot, app.project_dir))
        guest = files.path(out.guest_path)
        if problem := kind_problem(kinds.get(guest, GuestFileKind.MISSING)):
            raise OutputError(
                f"output {out.open_name}: guest file {guest} {problem}",
                hint="the program must leave each output as a regular file inside the job's directory",
            )
        part = task.slot / f".boincvm-{out.open_name}.part"
        try:
            task.vm.copy_from_guest(guest, part, max_bytes=out.max_nbytes)
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


def _cleanup(task: Task, record: CheckpointRecord | None) -> None:
    job = task.job
    if task.inputs.package is not None and job.package is not None:
        kind = job.package.resolved_kind
        assert kind is not None
        try:
            task.files.sh(uninstall_script(kind, job.exec_dir), timeout=120, what="uninstalling the package")
        except BoincvmError as exc:
            log.warning("%s", exc.message)
    if record is not None:
        with contextlib.suppress(BoincvmError):
            task.drop_checkpoint(record)


def _check_inside(path: Path, roots: Sequence[Path | None]) -> None:
    real = path.resolve()
    for root in roots:
        if root is not None and real.is_relative_to(root.resolve()):
            return
    raise PathEscapeError(f"output path {path} resolves outside the slot and project directories")


__all__ = ["OUTPUT_TAIL_CHARS", "complete", "output_tail"]
