"""``boincvm make-workunit``: program package + inputs -> BOINC workunit files (one or a batch)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from boincvm.cli import console
from boincvm.cli.params import (
    DIRECTORY,
    EXISTING,
    EXISTING_DIR,
    EXISTING_FILE,
    FILE,
    app_option,
    backend_option,
    force_option,
    json_option,
)

if TYPE_CHECKING:
    from boincvm.job import VmJob
    from boincvm.workunit.make import WorkunitRequest, WorkunitSet

# The core is imported inside the command, not here: the group imports this module to list
# the command, and ``boincvm --help`` stays instant (start-up speed, not an import circle).


def _parse_input(value: str) -> tuple[str, str, str | None]:
    open_name, eq, rest = value.partition("=")
    if not eq or not open_name or not rest:
        raise click.BadParameter(f"{value!r}: expected OPEN_NAME=PATH (or OPEN_NAME=PATH::GUEST_NAME)")
    path, sep, guest = rest.partition("::")
    return open_name, path, (guest if sep else None)


def _parse_output(value: str) -> tuple[str, str | None, int]:
    from boincvm.bounds import parse_size

    head, colon, size = value.rpartition(":")
    if not colon or not head:
        raise click.BadParameter(f"{value!r}: expected OPEN_NAME[=GUEST_NAME]:MAX_NBYTES")
    # NaN, inf and 1e999 are refused here (int(float('1e999')) would raise OverflowError).
    max_nbytes = parse_size(size, f"--output {head}: the size")
    open_name, eq, guest = head.partition("=")
    return open_name, (guest if eq else None), max_nbytes


@click.command("make-workunit", context_settings={"show_default": True})
@app_option
@click.option("--package", type=FILE, help="Guest package (.rpm or .tar.gz).")
@click.option(
    "--program",
    "program_dir",
    type=EXISTING_DIR,
    help="A program directory: packaged as an RPM installed under /opt/APP (instead of --package).",
)
@click.option("--program-version", default="1.0", help="Version of the package --program builds.")
@click.option("--application", help="Program the guest runs (absolute guest path or command).")
@click.option(
    "--command-line",
    help="Workunit arguments, appended to the job's command line in the guest; "
    "a jinja2 template with --batch.",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="OPEN=PATH[::GUEST]",
    help="An input file: logical name, host path (template with --batch), optional guest name.",
)
@click.option(
    "--output",
    "outputs",
    multiple=True,
    metavar="OPEN[=GUEST]:MAX_NBYTES",
    help="A result file: logical name, optional guest name, size limit in bytes.",
)
@click.option(
    "--job", "job_file", type=FILE, help="A vm job file to start from; the options above override it."
)
@click.option("--exec-dir", help="Working directory of the program in the guest.")
@click.option("--setenv", multiple=True, metavar="NAME=VALUE", help="Environment of the guest program.")
@click.option("--memory-mb", type=int, help="Guest memory (MiB).")
@click.option("--ncpus", type=int, help="Guest virtual CPUs.")
@click.option("--network/--no-network", default=None, help="Give the guest a network (off unless asked).")
@click.option(
    "--require-kvm",
    is_flag=True,
    help="Never fall back to TCG: a host without usable KVM makes a temporary exit with a notice "
    "(<vm_accel_required/>; ship it with an app version whose plan class asks for vmx or svm).",
)
@click.option(
    "--checkpoint-interval",
    type=float,
    help="Minimum seconds between checkpoints (the job's minimum_checkpoint_interval; default 600, "
    "or the app version's). The client's checkpoint period applies too: the longer wins.",
)
@click.option("--fraction-done-file", help="Guest file where the program writes its fraction done.")
@click.option("--credit-file", help="Guest file where the program writes operations done so far.")
@click.option("--cpu-time", type=click.Choice(["host", "guest"]), help="Which CPU time to claim.")
@click.option(
    "--checkpoint-mode",
    type=click.Choice(["vm", "app"]),
    help="vm: VM snapshots (default); app: copy only the program's own checkpoint files (--checkpoint-file).",
)
@click.option(
    "--checkpoint-file",
    "checkpoint_files",
    multiple=True,
    help="A file the program keeps as its checkpoint, relative to the job's directory (repeat; app mode).",
)
@backend_option()
# The rsc_* defaults are Resources' own (workunit/templates.py, Resources.for_job fills in
# what is not given): reading them here would import the core when click builds the command.
@click.option("--fpops-est", type=float, help="rsc_fpops_est (default: the input template's).")
@click.option("--fpops-bound", type=float, help="rsc_fpops_bound (default: the input template's).")
@click.option("--memory-bound", type=float, default=None, help="rsc_memory_bound (default: VM memory + 25%).")
@click.option("--disk-bound", type=float, help="rsc_disk_bound (default: the input template's).")
@click.option("--delay-bound", type=float, default=7 * 86400, help="delay_bound (seconds).")
@click.option("--target-nresults", type=int, default=1, help="Replicas per workunit.")
@click.option("--min-quorum", type=int, default=1, help="Replicas that must agree.")
@click.option(
    "--name",
    "name_template",
    default="{{ app }}_{{ index }}",
    help="Workunit name; a jinja2 template with --batch (row columns, index, app).",
)
@click.option(
    "--batch", type=EXISTING_FILE, help="CSV or JSON Lines file: one row of parameters per workunit."
)
@click.option("-o", "--output-dir", type=DIRECTORY, required=True, help="Directory to create.")
@click.option(
    "--buda-batch",
    type=EXISTING,
    help="A BUDA job batch (zip or directory): one workunit per job directory, shared_input_files/ once.",
)
@click.option(
    "--app-version",
    type=EXISTING_DIR,
    help="The app version the workunits are for: its defaults may name the program (a container image's do).",
)
@force_option
@json_option("Print a JSON summary on stdout.")
def command(**options: Any) -> None:
    """Make BOINC workunits: a vm job, input/output templates, staged files and create_work commands.

    One workunit, or with --batch one per row (thousands in one run; identical files are stored once).
    """
    import tempfile

    opts = _Options(**options)
    request = _request(opts)
    if opts.package is not None and opts.program_dir is not None:
        raise click.UsageError("give --package or --program, not both")
    if opts.buda_batch is not None and opts.batch is not None:
        raise click.UsageError("give --batch or --buda-batch, not both")
    with tempfile.TemporaryDirectory(prefix="boincvm-package-") as scratch:
        request = _with_buda_batch(request, opts, Path(scratch))
        request = _with_program(request, opts, Path(scratch))
        result = _make(request)
    _show(result, as_json=opts.as_json)


@dataclass(frozen=True)
class _Options:
    """The command's options, by their parameter names (click passes them so), typed once."""

    app_name: str
    package: Path | None
    program_dir: Path | None
    program_version: str
    application: str | None
    command_line: str | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    job_file: Path | None
    exec_dir: str | None
    setenv: tuple[str, ...]
    memory_mb: int | None
    ncpus: int | None
    network: bool | None
    require_kvm: bool
    checkpoint_interval: float | None
    fraction_done_file: str | None
    credit_file: str | None
    cpu_time: str | None
    checkpoint_mode: str | None
    checkpoint_files: tuple[str, ...]
    backend_options: tuple[tuple[str, str], ...]
    fpops_est: float | None
    fpops_bound: float | None
    memory_bound: float | None
    disk_bound: float | None
    delay_bound: float
    target_nresults: int
    min_quorum: int
    name_template: str
    batch: Path | None
    output_dir: Path
    buda_batch: Path | None
    app_version: Path | None
    force: bool
    as_json: bool


def _job(o: _Options) -> VmJob:
    """The vm job: ``--job``'s (or an empty one) with the options given laid over it."""
    from boincvm.job import BackendOption, CheckpointMode, CpuTimeSource, OutputFile, Task, VmJob, load_job

    job = load_job(o.job_file) if o.job_file else VmJob()
    task = job.task or Task()
    task = replace(
        task,
        application=o.application if o.application is not None else task.application,
        exec_dir=o.exec_dir if o.exec_dir is not None else task.exec_dir,
        setenv=o.setenv or task.setenv,
        fraction_done_filename=o.fraction_done_file or task.fraction_done_filename,
        credit_report_filename=o.credit_file or task.credit_report_filename,
    )
    outs = tuple(OutputFile(n, m, g) for n, g, m in map(_parse_output, o.outputs)) or job.output_files
    job = replace(
        job,
        task=task,
        output_files=outs,
        memory_mb=o.memory_mb if o.memory_mb is not None else job.memory_mb,
        ncpus=o.ncpus if o.ncpus is not None else job.ncpus,
        enable_network=o.network if o.network is not None else job.enable_network,
        vm_accel_required=True if o.require_kvm else job.vm_accel_required,
        minimum_checkpoint_interval=o.checkpoint_interval
        if o.checkpoint_interval is not None
        else job.minimum_checkpoint_interval,
        cpu_time_source=CpuTimeSource(o.cpu_time) if o.cpu_time else job.cpu_time_source,
        checkpoint_mode=CheckpointMode(o.checkpoint_mode) if o.checkpoint_mode else job.checkpoint_mode,
        checkpoint_files=o.checkpoint_files or job.checkpoint_files,
    )
    return job.merged(VmJob(backend_options=tuple(BackendOption(n, v) for n, v in o.backend_options)))


def _request(o: _Options) -> WorkunitRequest:
    """The typed request the core takes (before a BUDA batch or a --program package joins it)."""
    from boincvm.workunit.make import InputSpec, WorkunitRequest
    from boincvm.workunit.templates import Resources

    job = _job(o)
    resources = Resources.for_job(
        job,
        fpops_est=o.fpops_est,
        fpops_bound=o.fpops_bound,
        memory_bound=o.memory_bound,
        disk_bound=o.disk_bound,
        delay_bound=o.delay_bound,
        target_nresults=o.target_nresults,
        min_quorum=o.min_quorum,
    )
    request = WorkunitRequest(
        app_name=o.app_name,
        job=job,
        output_dir=o.output_dir,
        package=o.package,
        inputs=tuple(InputSpec(n, p, g) for n, p, g in map(_parse_input, o.inputs)),
        command_line=o.command_line or "",
        name=o.name_template,
        resources=resources,
        batch=o.batch,
        force=o.force,
        also_reads=tuple(
            (what, path)
            for what, path in (("--job", o.job_file), ("--program", o.program_dir))
            if path is not None
        ),
    )
    if o.app_version is not None:
        from boincvm.appversion.model import app_version_defaults, check_app_matches

        check_app_matches(o.app_version, o.app_name)
        request = replace(request, defaults=app_version_defaults(o.app_version))
    return request


def _with_buda_batch(request: WorkunitRequest, o: _Options, scratch: Path) -> WorkunitRequest:
    """With --buda-batch: one row per job directory, the shared inputs added, ``{{ cmdline }}`` appended."""
    if o.buda_batch is None:
        return request
    from boincvm.workunit.buda import read_buda_batch

    buda = read_buda_batch(o.buda_batch, scratch)
    default_name = o.name_template == "{{ app }}_{{ index }}"
    return replace(
        request,
        batch=buda.rows,
        inputs=request.inputs + buda.inputs,
        command_line=" ".join(w for w in (o.command_line or "", "{{ cmdline }}") if w),
        name="{{ app }}_{{ job }}" if default_name else o.name_template,
        also_reads=(*request.also_reads, ("--buda-batch", o.buda_batch)),
    )


def _with_program(request: WorkunitRequest, o: _Options, scratch: Path) -> WorkunitRequest:
    """With --program: the directory packaged as an RPM in ``scratch``, and that package used."""
    if o.program_dir is None:
        return request
    from boincvm.package import PackageRequest, build_package

    built = build_package(PackageRequest(o.program_dir, o.app_name, o.program_version), scratch)
    console.info(f"packaged {o.program_dir} as {built.path.name}")
    return replace(request, package=built.path)


def _make(request: WorkunitRequest) -> WorkunitSet:
    """Make the workunits under a progress bar (updated every 256, not per workunit)."""
    from boincvm.workunit.make import make_workunits

    with console.progress_bar("making workunits") as bar:
        task_id = bar.add_task("making workunits", total=None)

        def progress(done: int, total: int | None) -> None:
            if done % 256 == 0 or done == total:
                bar.update(task_id, completed=done, total=total)

        return make_workunits(request, progress)


def _show(result: WorkunitSet, *, as_json: bool) -> None:
    """What was made on stderr, warnings as notes; the directory (or a JSON summary) on stdout."""
    console.success(
        f"made {result.count} workunit{'s' if result.count != 1 else ''} in {result.directory} "
        f"({result.unique_files} files staged, {result.staged_bytes} bytes)"
    )
    for warning in result.warnings:
        console.note(warning)
    if as_json:
        console.out(json.dumps(result.as_dict(), indent=2))
    else:
        console.out(str(result.directory))
