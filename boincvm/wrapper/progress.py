"""What the guest program hands the wrapper at a poll: its contract files and the end of
its output, surveyed once, read and checked (:mod:`.guest_contract`, :mod:`.guest_output`),
and forwarded to the client and the status file.
"""

from __future__ import annotations

import contextlib
import logging

from boincvm.errors import GuestError
from boincvm.hypervisor.base import ProcessStatus
from boincvm.wrapper.guest_contract import (
    Survey,
    Trigger,
    completion_trigger,
    credit_report,
    fraction_done,
    ops_bound,
    temporary_exit_trigger,
)
from boincvm.wrapper.guest_files import SURVEY_READ_BYTES, TRIGGER_MAX_BYTES
from boincvm.wrapper.task import Task

log = logging.getLogger(__name__)

#: At most this much of the fraction-done and credit files is read (the last number counts).
PROGRESS_MAX_BYTES = 4096


def survey(task: Task, *, progress: bool, triggers: bool, outputs: bool = False) -> Survey:
    """The contract files due for reading now, surveyed in one guest command: each
    one's kind and, for the small regular ones, their contents (:data:`~.guest_contract.SURVEY_SCRIPT`).
    With ``outputs`` (the program has ended), the kind of each output file too, which the
    copy-out then needs to ask no more (:func:`.finish.complete`).

    Raises:
        GuestError: the guest's shell did not answer as the script prints.
    """
    job = task.job
    kinds_only = {o.guest_path: 0 for o in job.output_files} if outputs else {}
    read = []
    if progress:
        read += [job.fraction_done_filename, job.credit_report_filename]
    if triggers:
        read += [job.completion_trigger_file, job.temporary_exit_trigger_file]
    entries = {n: SURVEY_READ_BYTES + 1 for n in read if n}
    if progress:
        entries |= task.output.survey_entries()  # the program's output: as often as its progress
    return task.files.survey(kinds_only | entries | task.api.survey_entries())


def _ops_limit(task: Task, cpu: float) -> float | None:
    """The most operations the host could have done in the task's CPU time."""
    init = task.app.init_data
    return ops_bound(
        rsc_fpops_bound=init.rsc_fpops_bound,
        p_fpops=init.host_info.p_fpops,
        cpu_time=init.wu_cpu_time + cpu,
    )


def report(task: Task, status: ProcessStatus, survey: Survey) -> None:
    """Forward the fraction done, the operations and the CPU time to the client (the guest
    API's ``status`` wins over the job's files), and the program's latest output lines to
    the status file (:mod:`.guest_output`).

    Raises:
        GuestError, HypervisorError: the guest could not run the command that trims the
            program's output file (:meth:`~.guest_output.GuestOutput.take`).
    """
    fraction: float | None = None
    ops: float | None = None
    job, read, note = task.job, task.files.read, task.files.note
    data = read(job.fraction_done_filename, "fraction done", survey, PROGRESS_MAX_BYTES)
    if data is not None:
        got = fraction_done(data, f"fraction done file {job.fraction_done_filename}:")
        note("fraction done", got.note)
        fraction = got.value
    cpu = task.run_cpu()
    data = read(job.credit_report_filename, "credit report", survey, PROGRESS_MAX_BYTES)
    if data is not None:
        bound = _ops_limit(task, cpu)
        got = credit_report(data, bound, f"credit report file {job.credit_report_filename}:")
        note("credit report", got.note)
        ops = got.value
    api = task.api.read_status(survey, _ops_limit(task, cpu))
    if api is not None:
        fraction = api.fraction.value if api.fraction.value is not None else fraction
        ops = api.ops.value if api.ops.value is not None else ops
    want_network = api.want_network if api is not None else None
    task.app.report(fraction, cpu_time=cpu, fpops_cumulative=ops, want_network=want_network)
    if fraction is not None:
        task.status.fraction_done = fraction
    task.status.cpu_time = task.app.last_status.current_cpu_time
    task.output.take(survey, running=status.running)
    if shown := task.output.recent(status):
        task.status.last_output = shown
    task.write_status()


def trigger(task: Task, survey: Survey) -> Trigger | None:
    """The job's completion or temporary-exit trigger file, taken (removed) and parsed, or None."""
    for kind, name in (
        ("completion", task.job.completion_trigger_file),
        ("temporary_exit", task.job.temporary_exit_trigger_file),
    ):
        what = kind.replace("_", "-") + " trigger"
        data = task.files.read(name, what, survey, TRIGGER_MAX_BYTES)
        if data is None or name is None:
            continue
        with contextlib.suppress(GuestError):
            task.vm.run_program(["/bin/rm", "-f", task.files.path(name)], timeout=30)
        parse = completion_trigger if kind == "completion" else temporary_exit_trigger
        found = parse(data, f"{what} file {name}:")
        task.files.note(what, found.note)
        return found
    return None


__all__ = ["PROGRESS_MAX_BYTES", "report", "survey", "trigger"]
