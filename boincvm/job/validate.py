"""Checking a vm job: :func:`validate_job` returns findings that name their place,
:func:`resolve` fills in the defaults of a complete job, :func:`check_complete` raises on
the first error.

Backend options are checked by the backend that reads them (``Backend.check_options``),
reached through :mod:`boincvm.hypervisor.base`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from boincvm.bounds import number_problem
from boincvm.errors import BoincvmError, XmlError
from boincvm.findings import Finding, error, errors_in, has_errors, warning
from boincvm.hypervisor.base import BackendKind, backend_class
from boincvm.job.model import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_EXEC_DIR,
    DEFAULT_MEMORY_MB,
    DEFAULT_NCPUS,
    JOB_OPEN_NAME,
    MEMORY_TAG,
    ROOT,
    CheckpointMode,
    CpuTimeSource,
    InputFile,
    OutputFile,
    Package,
    ResolvedJob,
    Task,
    VmJob,
)
from boincvm.names import guest_path_problem, logical_name_problem, relative_path_problem

#: The backend names a job may give (BackendKind's values, in its order).
_BACKENDS = tuple(k.value for k in BackendKind)
_NAME_HINT = "give a plain file name: no '/', no '..', no control characters"
_PATH_HINT = "give a path relative to the job's directory, without '..' or control characters"


def resolve(job: VmJob) -> ResolvedJob:
    """Fill in the defaults and check that the job can run.

    Raises:
        XmlError: the job has errors (the first few are named) or lacks a task or a VM image.
    """
    findings = validate_job(job, complete=True)
    errors = errors_in(findings)
    if errors:
        raise XmlError(
            "the vm job is not complete: " + "; ".join(str(f) for f in errors[:3]),
            hint=errors[0].hint or "run 'boincvm validate' on the job and the app version",
        )
    task = job.task or Task()
    assert task.application is not None
    return ResolvedJob(
        backend=job.backend or BackendKind.QEMU.value,
        vm_image=job.vm_image,
        vm_kernel=job.vm_kernel,
        vm_initrd=job.vm_initrd,
        kernel_cmdline=job.kernel_cmdline or "",
        memory_mb=job.memory_mb or DEFAULT_MEMORY_MB,
        ncpus=job.ncpus or DEFAULT_NCPUS,
        enable_network=bool(job.enable_network),
        minimum_checkpoint_interval=(
            DEFAULT_CHECKPOINT_INTERVAL
            if job.minimum_checkpoint_interval is None
            else job.minimum_checkpoint_interval
        ),
        disable_automatic_checkpoints=bool(job.disable_automatic_checkpoints),
        boot_timeout=job.boot_timeout or DEFAULT_BOOT_TIMEOUT,
        cpu_time_source=job.cpu_time_source or CpuTimeSource.HOST,
        package=job.package,
        application=task.application,
        command_line=task.command_line or "",
        exec_dir=task.exec_dir or DEFAULT_EXEC_DIR,
        setenv=tuple(_split_setenv(s) for s in task.setenv),
        fraction_done_filename=task.fraction_done_filename,
        credit_report_filename=task.credit_report_filename,
        completion_trigger_file=task.completion_trigger_file,
        temporary_exit_trigger_file=task.temporary_exit_trigger_file,
        time_limit=task.time_limit,
        input_files=job.input_files,
        output_files=job.output_files,
        image_files=job.image_files,
        backend_options=tuple((o.name, o.value) for o in job.backend_options),
        vm_accel_required=bool(job.vm_accel_required),
        checkpoint_mode=job.checkpoint_mode or CheckpointMode.VM,
        checkpoint_files=job.checkpoint_files,
    )


def _split_setenv(item: str) -> tuple[str, str]:
    name, _, value = item.partition("=")
    return name, value


def validate_job(job: VmJob, *, complete: bool = False) -> list[Finding]:
    """Check a job's values; with ``complete`` also that it can run (task, image present).

    Returns findings, each naming its place; never raises.
    """
    out = _validate_machine(job)
    if job.package is not None:
        out.extend(_validate_package(job.package))
    if job.task is not None:
        out.extend(_validate_task(job.task))
    out.extend(_validate_files(job))
    out.extend(_validate_image_files(job))
    out.extend(_validate_backend_options(job, complete=complete))
    if job.vm_accel_required and any(o.name == "accel" and o.value == "tcg" for o in job.backend_options):
        out.append(
            error(
                f"{ROOT}.vm_accel_required",
                "contradicts backend_option accel=tcg",
                hint="drop one of them: KVM is either required or never used",
            )
        )
    out.extend(_validate_checkpoint_files(job, complete=complete))
    if complete:
        out.extend(_validate_runnable(job))
    return out


def _validate_machine(job: VmJob) -> list[Finding]:
    """The backend, the image's files, memory, CPUs and the time values."""
    out: list[Finding] = []
    p = ROOT
    if job.backend is not None and job.backend not in _BACKENDS:
        out.append(
            error(f"{p}.backend", f"{job.backend!r} is not a backend", hint=f"use {' or '.join(_BACKENDS)}")
        )
    for name in ("vm_image", "vm_kernel", "vm_initrd"):
        value = getattr(job, name)
        if value is not None and (problem := logical_name_problem(value)):
            out.append(error(f"{p}.{name}", problem, hint="give the logical name of an app version file"))
    if job.vm_initrd and not job.vm_kernel:
        out.append(error(f"{p}.vm_initrd", "needs vm_kernel"))
    if job.memory_mb is not None and not 32 <= job.memory_mb <= 1024 * 1024:
        out.append(error(f"{p}.{MEMORY_TAG}", f"{job.memory_mb} is outside 32..1048576", hint="give MiB"))
    if job.ncpus is not None and not 1 <= job.ncpus <= 256:
        out.append(error(f"{p}.ncpus", f"{job.ncpus} is outside 1..256", hint="give 1 to 256 CPUs"))
    # A job built from options (not parsed) may carry NaN or infinities too: checked here.
    ranges = (("minimum_checkpoint_interval", 0.0, False), ("boot_timeout", 0.0, True))
    for name, low, low_open in ranges:
        value = getattr(job, name)
        if value is not None and (problem := number_problem(value, low=low, low_open=low_open)):
            out.append(error(f"{p}.{name}", problem, hint="give a finite number of seconds"))
    return out


def _validate_package(package: Package) -> list[Finding]:
    if problem := logical_name_problem(package.file_name):
        return [error(f"{ROOT}.package.file_name", problem, hint=_NAME_HINT)]
    if package.resolved_kind is None:
        return [
            error(
                f"{ROOT}.package.kind",
                "cannot tell rpm from tar",
                hint="add <kind>rpm</kind> or <kind>tar</kind>",
            )
        ]
    return []


def _validate_runnable(job: VmJob) -> list[Finding]:
    """What a complete job needs: a program to run and an image to run it in."""
    out: list[Finding] = []
    if job.task is None or not job.task.application:
        out.append(
            error(f"{ROOT}.task.application", "must not be empty", hint="say which program the guest runs")
        )
    if not job.vm_image and not job.vm_kernel:
        out.append(
            error(
                f"{ROOT}.vm_image",
                "is missing",
                hint="the app version's vm_job_defaults.xml names the image",
            )
        )
    return out


def _validate_checkpoint_files(job: VmJob, *, complete: bool) -> list[Finding]:
    out: list[Finding] = []
    p = ROOT
    for i, name in enumerate(job.checkpoint_files):
        if problem := relative_path_problem(name):
            out.append(error(f"{p}.checkpoint_file[{i}]", problem, hint=_PATH_HINT))
    if len(set(job.checkpoint_files)) != len(job.checkpoint_files):
        out.append(error(f"{p}.checkpoint_file", "names a file more than once"))
    if job.checkpoint_mode is CheckpointMode.APP and not job.checkpoint_files and complete:
        out.append(
            error(
                f"{p}.checkpoint_mode",
                "is app, but no <checkpoint_file> says which files the program keeps",
                hint="add one <checkpoint_file>NAME</checkpoint_file> per checkpoint file of the program",
            )
        )
    if job.checkpoint_files and job.checkpoint_mode is not CheckpointMode.APP and complete:
        out.append(
            warning(
                f"{p}.checkpoint_file",
                "is used only with <checkpoint_mode>app</checkpoint_mode>; VM snapshots keep every file",
            )
        )
    return out


def _validate_task(task: Task) -> list[Finding]:
    out: list[Finding] = []
    p = f"{ROOT}.task"
    if task.application is not None and not task.application.strip():
        out.append(error(f"{p}.application", "must not be empty"))
    if task.exec_dir is not None and not task.exec_dir.startswith("/"):
        out.append(error(f"{p}.exec_dir", "must be an absolute guest path", hint="e.g. /tmp/boincvm"))
    for name in (
        "fraction_done_filename",
        "credit_report_filename",
        "completion_trigger_file",
        "temporary_exit_trigger_file",
    ):
        value = getattr(task, name)
        if value is not None and (problem := guest_path_problem(value)):
            out.append(error(f"{p}.{name}", problem, hint="give a guest path without control characters"))
    for i, item in enumerate(task.setenv):
        name, eq, _ = item.partition("=")
        if not eq or not name or not name.replace("_", "a").isalnum() or name[0].isdigit():
            out.append(
                error(f"{p}.setenv[{i}]", f"{item!r} is not NAME=VALUE", hint="e.g. OMP_NUM_THREADS=1")
            )
    if task.time_limit is not None and (problem := number_problem(task.time_limit, low=0, low_open=True)):
        out.append(error(f"{p}.time_limit", problem, hint="give a finite number of seconds"))
    if task.command_line is not None and "\0" in task.command_line:
        out.append(error(f"{p}.command_line", "contains a NUL character"))
    return out


def _validate_files(job: VmJob) -> list[Finding]:
    out: list[Finding] = []
    names: dict[str, str] = {JOB_OPEN_NAME: f"{ROOT} itself"}
    if job.package is not None:
        names.setdefault(job.package.file_name, f"{ROOT}.package")
    groups: tuple[tuple[str, Sequence[InputFile | OutputFile]], ...] = (
        ("input_file", job.input_files),
        ("output_file", job.output_files),
    )
    for kind, files in groups:
        for i, item in enumerate(files):
            place = f"{ROOT}.{kind}[{i}]"
            if problem := logical_name_problem(item.open_name):
                out.append(error(f"{place}.open_name", problem, hint=_NAME_HINT))
            elif item.open_name in names:
                out.append(
                    error(f"{place}.open_name", f"{item.open_name!r} is also used by {names[item.open_name]}")
                )
            else:
                names[item.open_name] = place
            if item.guest_name is not None and (problem := relative_path_problem(item.guest_name)):
                out.append(error(f"{place}.guest_name", problem, hint=_PATH_HINT))
            if isinstance(item, OutputFile):
                if item.max_nbytes is None:
                    out.append(
                        error(
                            f"{place}.max_nbytes",
                            "is missing",
                            hint="every output needs a size limit in bytes",
                        )
                    )
                elif item.max_nbytes <= 0:
                    out.append(
                        error(f"{place}.max_nbytes", "must be more than 0", hint="give a size in bytes")
                    )
    return out


def _validate_image_files(job: VmJob) -> list[Finding]:
    out: list[Finding] = []
    opens: set[str] = set()
    names: set[str] = set()
    for i, item in enumerate(job.image_files):
        place = f"{ROOT}.image_file[{i}]"
        if problem := logical_name_problem(item.open_name):
            out.append(error(f"{place}.open_name", problem, hint=_NAME_HINT))
        elif item.open_name in opens:
            out.append(error(f"{place}.open_name", f"{item.open_name!r} appears twice"))
        opens.add(item.open_name)
        if problem := relative_path_problem(item.file_name):
            out.append(error(f"{place}.file_name", problem, hint=_PATH_HINT))
        elif item.file_name in names:
            out.append(error(f"{place}.file_name", f"{item.file_name!r} appears twice"))
        names.add(item.file_name)
    if job.image_files and job.vm_image is not None and job.vm_image not in opens:
        out.append(
            error(
                f"{ROOT}.vm_image",
                f"{job.vm_image!r} is not one of the image_file open names",
                hint="a multi-file image lists its main file (the .vmx) among its image files",
            )
        )
    return out


_OPTION_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _validate_backend_options(job: VmJob, *, complete: bool) -> list[Finding]:
    out: list[Finding] = []
    names: set[str] = set()
    for i, option in enumerate(job.backend_options):
        place = f"{ROOT}.backend_option[{i}].name"
        if not _OPTION_NAME.fullmatch(option.name):
            out.append(error(place, f"{option.name!r} is not an option name (lower case, digits, _)"))
        elif option.name in names:
            out.append(error(place, f"{option.name!r} appears twice"))
        names.add(option.name)
    if out or not job.backend_options:
        return out
    # Which backend reads them is known once the job is complete or says so itself; until
    # then an option only has to suit one of the backends.
    backend = job.backend or (BackendKind.QEMU.value if complete else None)
    candidates = [backend] if backend is not None else list(_BACKENDS)
    if any(c not in _BACKENDS for c in candidates):
        return out  # an unknown backend is reported above
    for index, option in enumerate(job.backend_options):
        problems: list[tuple[str, BoincvmError]] = []
        for kind in candidates:
            try:
                backend_class(kind).check_options({option.name: option.value})
            except BoincvmError as exc:
                problems.append((kind, exc))
        if len(problems) == len(candidates):
            kind, first = problems[0]
            message = str(first).removeprefix("options.")
            out.append(error(f"{ROOT}.backend_option[{index}]", f"{kind}: {message}", hint=first.hint))
    if not out and backend is not None:  # options that are fine alone may still clash
        try:
            backend_class(backend).check_options({o.name: o.value for o in job.backend_options})
        except BoincvmError as exc:
            message = str(exc).removeprefix("options.")
            out.append(error(f"{ROOT}.backend_option", f"{backend}: {message}", hint=exc.hint))
    return out


def check_complete(job: VmJob) -> None:
    """Raise if the job has errors.

    Raises:
        XmlError: naming the first problem.
    """
    findings = validate_job(job)
    if has_errors(findings):
        first = errors_in(findings)[0]
        raise XmlError(f"vm job: {first}", hint=first.hint)
