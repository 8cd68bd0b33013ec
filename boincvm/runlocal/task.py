"""The slot task for one workunit: a made workunit directory and app version directory turned
into the :class:`~boincvm.boinc.slot.LocalTask` the client (emulated or real) is given."""

from __future__ import annotations

import stat
from pathlib import Path

from boincvm.appversion.model import app_version_defaults, check_app_matches, parse_version_xml, read_summary
from boincvm.boinc.slot import LocalTask, OutputFile, TaskFile
from boincvm.errors import BoincvmError, InputError
from boincvm.findings import errors_in
from boincvm.job import DEFAULT_CHECKPOINT_INTERVAL, JOB_OPEN_NAME, VmJob, load_job
from boincvm.runlocal.request import RunLocalRequest
from boincvm.workunit.directory import open_workunit_dir
from boincvm.workunit.templates import read_output_template, resources_of
from boincvm.xmlio import read_bytes


def build_task(req: RunLocalRequest) -> LocalTask:
    """The LocalTask for the workunit and app version directories.

    Raises:
        InputError: either directory is unusable, or they are for different apps.
    """
    wud = open_workunit_dir(req.workunit_dir)
    record = wud.record(req.workunit)
    check_app_matches(req.app_version_dir, wud.app_name)
    app_files = _app_files(req.app_version_dir)
    inputs = tuple(
        TaskFile(wud.download / f.physical_name, f.physical_name, f.open_name) for f in record.files
    )
    for t in inputs:
        if not t.source.is_file():
            raise InputError(
                f"workunit file {t.source} is missing", hint="run boincvm validate on the workunit"
            )
    tpl_findings, result_files = read_output_template(
        read_bytes(wud.output_template, what="output template"), wud.output_template.name
    )
    errors = errors_in(tpl_findings)
    if errors:
        raise InputError(f"{wud.output_template.name}: {errors[0]}")
    result = f"{record.name}_0"
    outputs = tuple(
        OutputFile(f"{result}_r0_{i}", f.open_name, optional=f.optional, max_nbytes=int(f.max_nbytes or 0))
        for i, f in enumerate(result_files)
    )
    res = resources_of(read_bytes(wud.input_template, what="input template"))

    return LocalTask(
        app_name=wud.app_name,
        wu_name=record.name,
        result_name=result,
        app_files=tuple(app_files),
        input_files=inputs,
        output_files=outputs,
        command_line=_quote_for_client(record.command_line),
        rsc_fpops_est=res.rsc_fpops_est,
        rsc_fpops_bound=res.rsc_fpops_bound,
        rsc_memory_bound=res.rsc_memory_bound,
        rsc_disk_bound=res.rsc_disk_bound,
        delay_bound=res.delay_bound,
    )


def _app_files(av: Path) -> list[TaskFile]:
    """The files of the app version ``av`` as its version.xml names them.

    Raises:
        InputError: the app version is for Windows hosts, its version.xml is unusable, a file
            is missing, or none is the main program.
    """
    _refuse_windows(av)
    vx, findings = parse_version_xml(read_bytes(av / "version.xml", what="version.xml"))
    if findings:
        raise InputError(f"{av}/version.xml: {findings[0]}")
    app_files = []
    for f in vx.files:
        src = av / f.physical_name
        if not src.is_file():
            raise InputError(f"app version file {src} is missing")
        # update_versions marks a file <executable/> from its owner's execute bit; so does this.
        executable = f.main_program or bool(src.stat().st_mode & stat.S_IXUSR)
        app_files.append(
            TaskFile(src, f.physical_name, f.logical_name, main_program=f.main_program, executable=executable)
        )
    if not any(f.main_program for f in app_files):
        raise InputError(f"{av}/version.xml names no main program")
    return app_files


def _refuse_windows(av: Path) -> None:
    """Refuse an app version for Windows hosts: its main program is BOINC's wsl_wrapper.exe.

    Raises:
        InputError: ``av`` was made with ``package-image --wsl-wrapper``.
    """
    summary = read_summary(av)
    if summary is not None and summary.get("wsl"):
        raise InputError(
            f"{av} is an app version for Windows hosts (BOINC's wsl_wrapper.exe runs it inside WSL), "
            "and run-local runs Linux app versions",
            hint="package the same image without --wsl-wrapper to try the workunit here",
        )


def _quote_for_client(cmd: str) -> str:
    # create_work stores the line as given; the client splits it itself.
    return cmd


def checkpoint_interval(req: RunLocalRequest) -> tuple[float, str]:
    """How often the wrapper checkpoints at most, and what decides it.

    The wrapper checkpoints when the client says it is time (its checkpoint period) and the
    job's ``minimum_checkpoint_interval`` has passed since the last one: the longer of the two
    wins. The job's value comes from the workunit's vm job, else the app version's defaults,
    else boincvm's default (600 s). A job with ``disable_automatic_checkpoints`` checkpoints
    only when its program asks: ``inf``.

    Raises:
        InputError: the workunit directory is unusable.
    """
    wud = open_workunit_dir(req.workunit_dir)
    record = wud.record(req.workunit)
    own = next((f for f in record.files if f.open_name == JOB_OPEN_NAME), None)
    try:
        defaults = app_version_defaults(req.app_version_dir)
        job = load_job(wud.download / own.physical_name) if own is not None else VmJob()
    except BoincvmError:
        # A job run-local cannot read is the wrapper's to refuse, as it would on a volunteer's host.
        return req.checkpoint_period, "the client's checkpoint period (the job is unreadable here)"
    merged = defaults.merged(job)
    if merged.disable_automatic_checkpoints:
        return float("inf"), "the job disables automatic checkpoints (only the program's own)"
    if job.minimum_checkpoint_interval is not None:
        minimum, source = (
            job.minimum_checkpoint_interval,
            "minimum_checkpoint_interval in the workunit's vm job",
        )
    elif defaults.minimum_checkpoint_interval is not None:
        minimum, source = (
            defaults.minimum_checkpoint_interval,
            "minimum_checkpoint_interval in the app version",
        )
    else:
        minimum, source = DEFAULT_CHECKPOINT_INTERVAL, "boincvm's default minimum_checkpoint_interval"
    if req.checkpoint_period >= minimum:
        return req.checkpoint_period, "the client's checkpoint period (--checkpoint-period)"
    return minimum, source
