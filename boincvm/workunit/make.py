"""Workunits: from a program package, inputs and a job to files a BOINC project submits.

``make_workunits`` writes one directory for one workunit or a whole batch::

    OUT/
      boincvm-workunits.json   summary: app, counts, template names (read by validate/run-local)
      workunits.jsonl          one line per workunit: name, files (open name, physical name, md5, size)
      jobs.txt                 the lines ``create_work --stdin`` reads
      create_work.sh           stages the files and runs create_work, from the project's root
      templates/               the BOINC input and output templates
      download/                every file, named by content, stored once

Files are content-addressed (``APP_<md5><suffix>``): identical inputs are staged once and
shared by every workunit that uses them, hard-linked from their source where the file
system allows (``create_work.sh`` or ``boincvm deploy`` then stage them in the project's download
hierarchy).
Everything is written to a temporary sibling directory and moved into place at the end, so
a failure never leaves half a batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from boincvm.atomicdir import building
from boincvm.bounds import finite, os_hint
from boincvm.errors import InputError, PackageError
from boincvm.findings import errors_in, has_errors
from boincvm.hashing import md5_file
from boincvm.job import (
    DEFAULT_MEMORY_MB,
    JOB_OPEN_NAME,
    InputFile,
    Package,
    PackageKind,
    VmJob,
    checkpoint_disk_mb,
    validate_job,
)
from boincvm.job.render import render_job
from boincvm.names import (
    check_identifier,
    check_logical_name,
    check_relative_path,
    sanitize_wu_name,
)
from boincvm.package.inspect import check_package
from boincvm.paths import inside, refuse_output_overlapping
from boincvm.render import (
    UserTemplate,
    compile_user_template,
    render,
    render_user_template,
    user_templates_bounded,
)
from boincvm.workunit.batch import read_batch
from boincvm.workunit.directory import (
    FORMAT_VERSION,
    JOBS_NAME,
    RECORDS_NAME,
    SUMMARY_NAME,
    StagedFile,
    WorkunitRecord,
    project_template_name,
)
from boincvm.workunit.templates import Resources

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class InputSpec:
    """One workunit input: its logical name and the host file (a template in batches)."""

    open_name: str
    path: str
    guest_name: str | None = None


@dataclass(frozen=True)
class WorkunitRequest:
    """What ``make-workunit`` was asked to make.

    Attributes:
        app_name: the BOINC application name.
        job: the vm job every workunit shares.
        command_line: the workunit's command line (a template in a batch); create_work gives it
            to the wrapper, which appends it to the job's command line in the guest.
        package: the guest package file on the host, or None (program already in the image).
        inputs: the input files (paths may be templates in a batch).
        name: the workunit name (a template in a batch).
        resources: the input template's workunit parameters.
        output_dir: where the directory is made.
        batch: a CSV or JSON Lines file of parameter rows, or None for a single workunit.
        force: replace an existing output directory.
        also_reads: other files the command read (the job file, the program directory),
            which the output directory must not overlap either.
        defaults: the job defaults of the app version the workunits are for (``--app-version``),
            against which the job is checked for a program: a container image's app version
            names it, so its workunits need none.
    """

    app_name: str
    job: VmJob
    output_dir: Path
    package: Path | None = None
    inputs: tuple[InputSpec, ...] = ()
    command_line: str = ""
    name: str = "{{ app }}_{{ index }}"
    resources: Resources = field(default_factory=Resources)
    batch: Path | None = None
    force: bool = False
    also_reads: tuple[tuple[str, Path], ...] = ()
    defaults: VmJob | None = None


@dataclass(frozen=True)
class WorkunitSet:
    """The result of ``make_workunits``."""

    directory: Path
    app_name: str
    count: int
    unique_files: int
    staged_bytes: int
    input_template: str
    output_template: str
    #: Sentences about choices that work but may fail on volunteers' hosts (:func:`advisories`).
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "directory": str(self.directory),
            "app_name": self.app_name,
            "count": self.count,
            "unique_files": self.unique_files,
            "staged_bytes": self.staged_bytes,
            "input_template": self.input_template,
            "output_template": self.output_template,
            "warnings": list(self.warnings),
        }


# -- hashing and staging ---------------------------------------------------------------------


#: Files at least this big are hashed once per run, however many workunits share them.
REMEMBER_MIN_BYTES = 64 * 1024

_SUFFIX_OK = re.compile(r"^(\.[A-Za-z0-9]{1,8}){1,2}$")


def _suffix(name: str) -> str:
    lower = name.lower()
    for double in (".tar.gz", ".tar.xz", ".tar.bz2"):
        if lower.endswith(double):
            return double
    suffix = os.path.splitext(name)[1]  # noqa: PTH122 - hot loop; str paths are faster
    return suffix if _SUFFIX_OK.match(suffix) else ""


class _Stager:
    """Stores files by content in ``download/``, each once, remembering what it hashed."""

    def __init__(self, app: str, download: Path, replaced: Path | None = None) -> None:
        self.app = app
        self.download = download
        # The existing output directory --force will replace: no input may come from it.
        self.replaced = replaced
        # Only large files are remembered: a batch's many small unique inputs would make
        # memory grow with the batch, and hashing them again costs less than a stat.
        self._by_source: dict[tuple[int, int, int, int], tuple[str, int, str]] = {}
        self._staged: set[str] = set()
        self.staged_bytes = 0

    def _physical(self, md5: str, name: str) -> str:
        return f"{self.app}_{md5}{_suffix(name)}"

    def add_file(self, path: str | Path, *, place: str) -> tuple[str, str, int]:
        try:
            st = os.stat(path)  # noqa: PTH116 - hot loop over thousands of rows
        except FileNotFoundError:
            raise InputError(
                f"{place}: input file {path} does not exist",
                hint="check the path (in a batch, relative paths start at the batch file)",
            ) from None
        except OSError as exc:
            raise InputError(f"{place}: cannot read {path}: {exc.strerror}", hint=os_hint(exc)) from None
        if not stat.S_ISREG(st.st_mode):
            raise InputError(
                f"{place}: {path} is not a regular file", hint="inputs are ordinary files (no FIFO or device)"
            )
        if self.replaced is not None and inside(path, self.replaced):
            raise InputError(
                f"{place}: input file {path} lies inside the output directory {self.replaced}, "
                "which --force would delete",
                hint="choose another output directory (-o) that holds none of the inputs",
            )
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        known = self._by_source.get(key)
        if known is None:
            md5, size = md5_file(path)
            known = (md5, size, self._physical(md5, os.path.basename(path)))  # noqa: PTH119
            if size >= REMEMBER_MIN_BYTES:
                self._by_source[key] = known
        md5, size, physical = known
        if physical not in self._staged:
            target = os.path.join(self.download, physical)  # noqa: PTH118
            try:
                # A hard link shares the data instead of copying it: one directory entry,
                # some 30 times cheaper than a copy here. create_work.sh stages copies into
                # the project, and validate catches a source edited in place meanwhile.
                os.link(path, target)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(path, target)
            self._staged.add(physical)
            self.staged_bytes += size
        return physical, md5, size

    def add_bytes(self, data: bytes, name: str) -> tuple[str, str, int]:
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        physical = self._physical(md5, name)
        if physical not in self._staged:
            (self.download / physical).write_bytes(data)
            self._staged.add(physical)
            self.staged_bytes += len(data)
        return physical, md5, len(data)

    @property
    def unique(self) -> int:
        return len(self._staged)


def create_work_line(record: WorkunitRecord, *, where: str) -> str:
    """The ``create_work --stdin`` line for one workunit.

    create_work splits the line like a shell without escapes: a value is wrapped in single
    quotes, or double quotes when it contains a single quote; it cannot hold both, nor a
    newline, and a line is read into 4,096 bytes.

    Raises:
        InputError: the command line cannot be passed to create_work.
    """
    parts = ["--wu_name", record.name]
    cmd = record.command_line
    if cmd:
        if "\n" in cmd or "\r" in cmd or "\0" in cmd:
            raise InputError(
                f"{where}: the command line contains a line break or NUL, which create_work cannot pass",
                hint="put the command line on one line",
            )
        if "'" not in cmd:
            quoted = f"'{cmd}'"
        elif '"' not in cmd:
            quoted = f'"{cmd}"'
        else:
            raise InputError(
                f"{where}: the command line has both ' and \" quotes, which create_work cannot pass",
                hint="use one kind of quote in the command line",
            )
        parts += ["--command_line", quoted]
    parts += [f.physical_name for f in record.files]
    line = " ".join(parts)
    if len(line.encode()) >= CREATE_WORK_LINE_MAX:
        raise InputError(
            f"{where}: the create_work line is {len(line.encode())} bytes; create_work reads at most "
            f"{CREATE_WORK_LINE_MAX - 1}",
            hint="shorten the command line or use fewer input files",
        )
    return line


#: create_work reads each --stdin line into a 4,096-byte buffer.
CREATE_WORK_LINE_MAX = 4096


# -- making workunits ------------------------------------------------------------------------


def _check_request(req: WorkunitRequest) -> None:
    check_identifier(req.app_name, "app name")
    findings = errors_in(validate_job(req.job))
    if findings:
        raise InputError(f"{findings[0]}", hint=findings[0].hint)
    task = (req.defaults.merged(req.job) if req.defaults is not None else req.job).task
    if task is None or not task.application:
        raise InputError(
            "vm_job.task.application: must not be empty",
            hint="give --application, or --app-version of an app version whose defaults name the program",
        )
    seen = {JOB_OPEN_NAME}
    for spec in req.inputs:
        check_logical_name(spec.open_name, f"input {spec.open_name!r}")
        if spec.guest_name is not None:
            check_relative_path(spec.guest_name, f"input {spec.open_name!r}: guest name")
        if spec.open_name in seen:
            raise InputError(
                f"input {spec.open_name!r}: the logical name is used twice",
                hint="give each input its own name",
            )
        seen.add(spec.open_name)
    for out in req.job.output_files:
        if out.open_name in seen:
            raise InputError(
                f"output {out.open_name!r}: the logical name is also an input",
                hint="give the output another logical name",
            )
    r = req.resources
    for name in ("rsc_fpops_est", "rsc_fpops_bound", "rsc_memory_bound", "rsc_disk_bound", "delay_bound"):
        finite(getattr(r, name), name, low=0, low_open=True)
    for est, bound in (("rsc_fpops_est", "rsc_fpops_bound"),):
        if getattr(r, bound) < getattr(r, est):
            raise InputError(
                f"{bound} ({getattr(r, bound):g}) is below {est} ({getattr(r, est):g})",
                hint="the bound must be at least the estimate",
            )
    if not (
        r.target_nresults <= r.max_success_results <= r.max_total_results
        and r.max_error_results <= r.max_total_results
        and r.min_quorum <= r.target_nresults
    ):
        raise InputError(
            "replication: need min_quorum <= target_nresults <= max_success_results <= "
            "max_total_results and max_error_results <= max_total_results",
            hint="lower --min-quorum or raise --target-nresults",
        )
    if req.job.memory_mb is not None and req.job.memory_mb * 1024 * 1024 > r.rsc_memory_bound:
        raise InputError(
            f"rsc_memory_bound ({r.rsc_memory_bound:g} bytes) is below the VM's memory "
            f"({req.job.memory_mb} MiB)",
            hint="raise --memory-bound; the client must not run the VM on hosts without that memory",
        )


def make_workunits(req: WorkunitRequest, progress: Progress | None = None) -> WorkunitSet:
    """Make the workunit directory described by ``req``.

    Raises:
        InputError: bad request, missing input, bad batch row, or the output exists (without force).
    """
    _check_request(req)
    _refuse_destroying_inputs(req)
    if req.package is not None:
        _check_package(req.package)
    with building(req.output_dir, force=req.force) as tmp:
        result = _write(req, tmp, progress)
    return replace(result, directory=req.output_dir)


def _refuse_destroying_inputs(req: WorkunitRequest) -> None:
    """The output directory (deleted by --force) must not be, hold or lie in any input.

    Input paths that are templates are checked per row when staged (see ``_Stager``).
    """
    reads = list(req.also_reads)
    reads += [("--package", req.package)] if req.package is not None else []
    reads += [("--batch", req.batch)] if req.batch is not None else []
    reads += [(f"--input {s.open_name}", Path(s.path)) for s in req.inputs if "{" not in s.path]
    refuse_output_overlapping(req.output_dir, reads)


def _check_package(path: Path) -> None:
    """Run the check ``validate`` runs on a package, so a hostile one never reaches a workunit.

    Raises:
        PackageError: the first problem found (a member with '..', absolute, setuid, a device...).
    """
    findings = check_package(path)
    if has_errors(findings):
        bad = errors_in(findings)[0]
        raise PackageError(
            f"package {path.name} was refused: {bad.place}: {bad.message}",
            hint=bad.hint or "rebuild it with 'boincvm package-rpm'; 'boincvm validate' lists every problem",
        )


def _write(req: WorkunitRequest, tmp: Path, progress: Progress | None) -> WorkunitSet:
    (tmp / "download").mkdir()
    (tmp / "templates").mkdir()
    replaced = req.output_dir if req.output_dir.exists() else None
    stager = _Stager(req.app_name, tmp / "download", replaced)
    base_job, package_file = _with_package(req, stager)
    templates = _RowTemplates.of(req)
    base_job = replace(base_job, input_files=tuple(InputFile(s.open_name, s.guest_name) for s in req.inputs))
    # Every workunit of a batch shares one job file; what differs per row is the command
    # line (passed by create_work, appended by the wrapper) and the input files.
    job_file = StagedFile(JOB_OPEN_NAME, *stager.add_bytes(render_job(base_job).encode("utf-8"), "job.xml"))
    fixed = [job_file] + ([package_file] if package_file is not None else [])
    count = _write_rows(req, tmp, _Row(templates, stager, fixed), progress)
    open_names = [f.open_name for f in fixed] + [s.open_name for s in req.inputs]
    in_name, out_name = _write_templates(req, tmp, open_names, base_job)
    summary = {
        "format": FORMAT_VERSION,
        "app_name": req.app_name,
        "count": count,
        "unique_files": stager.unique,
        "staged_bytes": stager.staged_bytes,
        "input_template": f"templates/{in_name}",
        "output_template": f"templates/{out_name}",
        "open_names": open_names,
    }
    (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return WorkunitSet(
        tmp,
        req.app_name,
        count,
        stager.unique,
        stager.staged_bytes,
        f"templates/{in_name}",
        f"templates/{out_name}",
        advisories(req),
    )


def _with_package(req: WorkunitRequest, stager: _Stager) -> tuple[VmJob, StagedFile | None]:
    """The job naming the package (staged), or the job as it is without one."""
    if req.package is None:
        return req.job, None
    kind = (req.job.package.kind if req.job.package else None) or PackageKind.from_filename(req.package.name)
    if kind is None:
        raise InputError(
            f"package {req.package.name}: cannot tell whether it is an RPM or a tarball",
            hint="name it .rpm or .tar.gz",
        )
    open_name = "package.rpm" if kind is PackageKind.RPM else "package.tar.gz"
    physical, md5, size = stager.add_file(req.package, place="package")
    return replace(req.job, package=Package(open_name, kind)), StagedFile(open_name, physical, md5, size)


@dataclass(frozen=True)
class _RowTemplates:
    """The request's user templates, compiled once for every row."""

    command_line: UserTemplate
    name: UserTemplate
    paths: tuple[UserTemplate, ...]

    @classmethod
    def of(cls, req: WorkunitRequest) -> _RowTemplates:
        return cls(
            compile_user_template(req.command_line, place="command line"),
            compile_user_template(req.name, place="workunit name"),
            tuple(compile_user_template(s.path, place=f"input {s.open_name}") for s in req.inputs),
        )


@dataclass
class _Row:
    """What every row's workunit is made with: the templates, the stager, the shared files,
    and the names taken so far."""

    templates: _RowTemplates
    stager: _Stager
    fixed: list[StagedFile]
    names: set[str] = field(default_factory=set)


def _write_rows(req: WorkunitRequest, tmp: Path, make: _Row, progress: Progress | None) -> int:
    """Write each row's record and create_work line, staging its inputs; the number of rows.

    A single workunit is a batch of one row without columns.
    """
    rows: Iterator[dict[str, Any]] = read_batch(req.batch) if req.batch else iter([{}])
    total = None if req.batch else 1
    count = 0
    with (
        (tmp / RECORDS_NAME).open("w", encoding="utf-8") as records,
        (tmp / JOBS_NAME).open("w", encoding="utf-8") as jobs,
        user_templates_bounded(),
    ):
        for index, row in enumerate(rows):
            where = f"batch row {index + 1}" if req.batch else "workunit"
            record = _row_record(req, make, {"app": req.app_name, "index": index, **row}, where)
            records.write(record.to_json() + "\n")
            jobs.write(create_work_line(record, where=where) + "\n")
            count += 1
            if progress is not None:
                progress(count, total)
    if count == 0:
        raise InputError(
            f"batch file {req.batch}: has no rows", hint="add a header line and one row per workunit"
        )
    return count


def _row_record(req: WorkunitRequest, make: _Row, ctx: dict[str, Any], where: str) -> WorkunitRecord:
    """One row's workunit: its name (taken), command line and files (its inputs staged)."""
    name = sanitize_wu_name(render_user_template(make.templates.name, ctx, place=f"{where}: name"))
    if not name.strip("."):
        raise InputError(
            f"{where}: workunit name {name!r} is not a usable name",
            hint="make --name render to letters and digits, e.g. {{ app }}_{{ index }}",
        )
    if name in make.names:
        raise InputError(
            f"{where}: workunit name {name!r} is used twice",
            hint="make --name unique per row, e.g. include {{ index }}",
        )
    make.names.add(name)
    command_line = render_user_template(make.templates.command_line, ctx, place=f"{where}: command line")
    batch_dir = req.batch.parent if req.batch else None
    files = list(make.fixed)
    for spec, path_t in zip(req.inputs, make.templates.paths, strict=True):
        host = render_user_template(path_t, ctx, place=f"{where}: input {spec.open_name}")
        if batch_dir is not None and not os.path.isabs(host):  # noqa: PTH117
            host = os.path.join(batch_dir, host)  # noqa: PTH118
        staged = make.stager.add_file(host, place=f"{where}: {spec.open_name}")
        files.append(StagedFile(spec.open_name, *staged))
    return WorkunitRecord(name, tuple(files), command_line)


def _write_templates(req: WorkunitRequest, tmp: Path, open_names: list[str], job: VmJob) -> tuple[str, str]:
    """The input and output templates and create_work.sh; the templates' names."""
    in_name = f"{req.app_name}_in.xml"
    out_name = f"{req.app_name}_out.xml"
    in_xml = render("input_template.xml.j2", open_names=open_names, r=req.resources).encode()
    out_xml = render("output_template.xml.j2", outputs=job.output_files).encode()
    (tmp / "templates" / in_name).write_bytes(in_xml)
    (tmp / "templates" / out_name).write_bytes(out_xml)
    script = tmp / "create_work.sh"
    script.write_text(
        render(
            "create_work.sh.j2",
            app=req.app_name,
            in_name=in_name,
            out_name=out_name,
            in_project=project_template_name(in_name, in_xml),
            out_project=project_template_name(out_name, out_xml),
        ),
        encoding="utf-8",
    )
    script.chmod(0o755)
    return in_name, out_name


def advisories(req: WorkunitRequest) -> tuple[str, ...]:
    """What may fail on a volunteer's host although the request is valid.

    A checkpoint holds the memory the guest wrote (a RAM diff its written pages, a
    snapshot-save all its touched RAM), and two exist while one replaces the other; the
    client aborts a task whose slot outgrows ``rsc_disk_bound``. A bound below the VM's
    memory is flagged: one checkpoint of a guest that filled its RAM does not fit.
    """
    job = req.defaults.merged(req.job) if req.defaults is not None else req.job
    found = []
    memory_mb = job.memory_mb or DEFAULT_MEMORY_MB
    bound = req.resources.rsc_disk_bound
    if bound < memory_mb * 2**20:
        found.append(
            f"rsc_disk_bound ({bound:g} bytes) is below the VM's memory ({memory_mb} MiB): "
            "a job that fills the guest's RAM makes checkpoints that outgrow it, and the client "
            f"then aborts the task; --disk-bound {checkpoint_disk_mb(memory_mb) * 2**20} leaves room for two"
        )
    return tuple(found)
