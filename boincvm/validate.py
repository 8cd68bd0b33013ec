"""``validate``: tell what a path is and whether it is well-formed and consistent.

One entry point, :func:`validate_path`, recognises a vm job file, a BOINC template, a
workunit directory, an app version directory, a guest package, a disk image or a
VMware VM, and returns a :class:`Report` whose findings each name their place.
"""

from __future__ import annotations

import contextlib
import enum
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from boincvm.appversion.check import check_app_version
from boincvm.appversion.model import app_version_app_name
from boincvm.appversion.plan_class import ENTRY_NAME as PLAN_CLASS_ENTRY
from boincvm.appversion.plan_class import FILE_NAME as PLAN_CLASS_FILE
from boincvm.appversion.plan_class import check_plan_class_spec
from boincvm.bounds import require_regular_file
from boincvm.errors import BoincvmError, InputError
from boincvm.findings import Finding, error, has_errors, info, warning
from boincvm.hashing import md5_file
from boincvm.hypervisor.vmware.inspect import check_vmware
from boincvm.image.elf import looks_like_kernel
from boincvm.image.inspect import check_guest_tools
from boincvm.image.oci import load_image
from boincvm.job import JOB_OPEN_NAME, parse_job, validate_job
from boincvm.package import check_package
from boincvm.workunit.directory import (
    SUMMARY_NAME,
    StagedFile,
    WorkunitDir,
    WorkunitRecord,
    open_workunit_dir,
)
from boincvm.workunit.templates import check_input_template, check_output_template
from boincvm.xmlio import read_bytes

#: Findings of one kind repeated over many workunits are cut after this many.
MAX_REPEATS = 20


class PathKind(enum.StrEnum):
    """What ``validate`` recognised."""

    VM_JOB = "vm job"
    INPUT_TEMPLATE = "input template"
    OUTPUT_TEMPLATE = "output template"
    WORKUNIT_DIR = "workunit directory"
    APP_VERSION = "app version"
    PACKAGE = "package"
    IMAGE = "image"
    VMWARE = "vmware vm"
    PLAN_CLASS_SPEC = "plan class spec"
    CONTAINER_IMAGE = "container image"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Report:
    """The verdict on one path."""

    path: Path
    kind: PathKind
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        """True when there is no error finding."""
        return not has_errors(list(self.findings))

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "path": str(self.path),
            "kind": self.kind.value,
            "valid": self.ok,
            "findings": [f.as_dict() for f in self.findings],
        }


def validate_path(path: Path, *, boot: bool = False) -> Report:
    """Validate whatever ``path`` is.

    Args:
        path: a file or directory.
        boot: for images, also boot them and wait (bounded) for the guest tools.

    Raises:
        InputError: the path does not exist or is of no kind boincvm knows.
    """
    if not path.exists():
        raise InputError(f"{path} does not exist", hint="check the path")
    if not path.is_dir():
        # A FIFO or device is refused before anything opens it (an open would hang or never end).
        require_regular_file(path, what="validate: path")
    kind = detect_kind(path)
    findings: list[Finding]
    if kind is PathKind.WORKUNIT_DIR:
        findings = check_workunit_dir(path)
    elif kind is PathKind.APP_VERSION:
        findings = check_app_version(path)
    elif kind is PathKind.VM_JOB:
        findings = check_job_file(path)
    elif kind is PathKind.INPUT_TEMPLATE:
        findings, _ = check_input_template(read_bytes(path, what="input template"), path.name)
    elif kind is PathKind.OUTPUT_TEMPLATE:
        findings, _ = check_output_template(read_bytes(path, what="output template"), path.name)
    elif kind is PathKind.PLAN_CLASS_SPEC:
        data = read_bytes(path, what=PLAN_CLASS_FILE)
        findings = check_plan_class_spec(data, plan_class=None, job=None, in_app_version=False)
    elif kind is PathKind.PACKAGE:
        findings = list(check_package(path))
    elif kind is PathKind.VMWARE:
        findings = list(check_vmware(path))
    elif kind is PathKind.CONTAINER_IMAGE:
        findings = check_container_image(path)
    else:
        findings = list(check_guest_tools(path, boot=boot))
    return Report(path, kind, tuple(findings))


_PACKAGE_SUFFIXES = (".rpm", ".tar.gz", ".tgz", ".tar")
_IMAGE_SUFFIXES = (".qcow2", ".img", ".raw", ".cpio", ".cpio.gz", ".cpio.lz4", ".cpio.zst", ".iso")
#: What an XML file is, told by a root tag in its first 4 KiB (the tags are tried in this order).
_XML_ROOTS = {
    "<vm_job": PathKind.VM_JOB,
    "<input_template": PathKind.INPUT_TEMPLATE,
    "<output_template": PathKind.OUTPUT_TEMPLATE,
    "<version": PathKind.APP_VERSION,
    "<plan_classes": PathKind.PLAN_CLASS_SPEC,
}


def detect_kind(path: Path) -> PathKind:
    """Recognise a path by its layout, suffix or XML root.

    Raises:
        InputError: nothing boincvm knows.
    """
    name = path.name.lower()
    if _is_container_image(path):
        return PathKind.CONTAINER_IMAGE
    if path.is_dir():
        if (path / SUMMARY_NAME).is_file():
            return PathKind.WORKUNIT_DIR
        if (path / "version.xml").is_file():
            return PathKind.APP_VERSION
        if (path / "boincvm-image.json").is_file():
            return PathKind.IMAGE
        if any(p.suffix == ".vmx" for p in path.iterdir()):
            return PathKind.VMWARE
        raise InputError(
            f"{path} is a directory boincvm does not recognise",
            hint="expected a workunit directory (make-workunit), an app version (package-image), "
            "an image or an OCI image layout",
        )
    if name.endswith(_PACKAGE_SUFFIXES):
        return PathKind.PACKAGE
    if name.endswith((".vmx", ".vmdk")):
        return PathKind.VMWARE
    if name.endswith(_IMAGE_SUFFIXES):
        return PathKind.IMAGE
    if name == "version.xml":
        return PathKind.APP_VERSION
    if name in (PLAN_CLASS_FILE, PLAN_CLASS_ENTRY):
        return PathKind.PLAN_CLASS_SPEC
    if name.endswith(".xml") or name.endswith("_in") or name.endswith("_out"):
        head = read_bytes(path, what="file")[:4096].decode("utf-8", "replace")
        for tag, kind in _XML_ROOTS.items():
            if tag in head:
                return kind
        return PathKind.VM_JOB  # an XML file we cannot place is judged as a job, with clear errors

    if path.suffix == "" and looks_like_kernel(path):
        return PathKind.IMAGE
    raise InputError(
        f"{path.name}: boincvm does not know what this file is",
        hint="validate takes a vm job (.xml), template, workunit or app version directory, "
        "package (.rpm, .tar.gz), image (.qcow2, .img, .vmdk) or .vmx",
    )


def _is_container_image(path: Path) -> bool:
    """An OCI image layout (``oci-layout`` + ``index.json``) or a docker/podman save tarball."""
    if path.is_dir():
        return (path / "oci-layout").is_file() and (path / "index.json").is_file()
    if not path.name.lower().endswith(".tar") or not path.is_file():
        return False
    try:
        with tarfile.open(path) as tar:
            names = set()
            for _ in range(64):  # the top-level documents come first; never read a whole archive
                member = tar.next()
                if member is None:
                    break
                names.add(member.name.lstrip("./"))
    except (tarfile.TarError, OSError):
        return False
    return "manifest.json" in names or {"oci-layout", "index.json"} <= names


def check_container_image(path: Path) -> list[Finding]:
    """Findings for a container image (what ``build-image --from-oci`` takes)."""
    try:
        image = load_image(path)
    except BoincvmError as exc:
        return [error("image", exc.message, exc.hint)]
    return [
        info("image", f"linux/amd64, {len(image.layers)} layers, identity {image.identity[:19]}"),
        info("image", "build a guest from it with 'boincvm build-image --from-oci'"),
    ]


def validate_paths(paths: Sequence[Path], *, boot: bool = False) -> list[Report]:
    """A report for every path (one that cannot be read or placed gets an error finding, and
    the others are still judged), then the cross-checks between them: workunits and app
    versions given together must be for the same app."""
    reports = []
    for path in paths:
        try:
            reports.append(validate_path(path, boot=boot))
        except BoincvmError as exc:
            reports.append(Report(path, PathKind.UNKNOWN, (error("path", exc.message, exc.hint),)))
    return _cross_check(reports)


def _cross_check(reports: list[Report]) -> list[Report]:
    apps = {}
    for r in reports:
        if r.kind is PathKind.APP_VERSION and (name := app_version_app_name(r.path)) is not None:
            apps[r.path] = name
    if not apps:
        return reports
    out = []
    for r in reports:
        if r.kind is PathKind.WORKUNIT_DIR:
            with contextlib.suppress(BoincvmError):
                app = open_workunit_dir(r.path).app_name
                wrong = {str(p): a for p, a in apps.items() if a != app}
                if wrong:
                    theirs = ", ".join(f"{p} is for {a!r}" for p, a in wrong.items())
                    found = error(
                        "app_name",
                        f"the workunits are for app {app!r}, but the app version {theirs}",
                        hint="make the workunits with --app set to the app version's app, "
                        "or give the app version of theirs",
                    )
                    r = Report(r.path, r.kind, (*r.findings, found))
        out.append(r)
    return out


# -- vm jobs --------------------------------------------------------------------------------


def check_job_file(path: Path) -> list[Finding]:
    """Findings for a vm job file (parse errors become one finding)."""
    try:
        job, findings = parse_job(read_bytes(path, what="vm job file"), what=f"vm job file {path.name}")
    except BoincvmError as exc:
        return [error(path.name, exc.message, exc.hint)]
    return findings + validate_job(job)


# -- templates ------------------------------------------------------------------------------

# -- workunit directories ---------------------------------------------------------------------


def check_workunit_dir(path: Path) -> list[Finding]:
    """Findings for a directory made by ``make-workunit``: templates, records, staged files, jobs."""
    try:
        wud = open_workunit_dir(path)
    except BoincvmError as exc:
        return [error(path.name, exc.message, exc.hint)]
    out, out_sizes = _check_wu_templates(wud)
    records = _RecordChecker(wud, out_sizes, out)
    count = 0
    try:
        for rec in wud.records():
            count += 1
            records.check(rec)
    except BoincvmError as exc:
        out.append(error("workunits.jsonl", exc.message, exc.hint))
    if count != wud.count:
        out.append(error("workunits.jsonl", f"has {count} workunits, the summary says {wud.count}"))
    for key, n in records.repeats.items():
        if n > MAX_REPEATS:
            out.append(
                warning("workunits", f"{n - MAX_REPEATS} more findings like {key.split(':')[0]!r} not shown")
            )
    if not has_errors(out):
        out.append(info(path.name, f"{count} workunits, {len(records.checked)} distinct files checked"))
    return out


def _check_wu_templates(wud: WorkunitDir) -> tuple[list[Finding], dict[str, float | None]]:
    """Findings for a workunit directory's templates, and the output template's max_nbytes by open name."""
    in_findings, in_names = (
        check_input_template(read_bytes(wud.input_template, what="input template"), wud.input_template.name)
        if wud.input_template.is_file()
        else ([error("input_template", f"{wud.input_template} is missing")], [])
    )
    out_findings, out_sizes = (
        check_output_template(
            read_bytes(wud.output_template, what="output template"), wud.output_template.name
        )
        if wud.output_template.is_file()
        else ([error("output_template", f"{wud.output_template} is missing")], {})
    )
    out = in_findings + out_findings
    if in_names and in_names != list(wud.open_names):
        out.append(
            error(
                "input_template", f"open names {in_names} differ from the workunits' {list(wud.open_names)}"
            )
        )
    return out, out_sizes


class _RecordChecker:
    """Checks workunit records into ``out``: each staged file and job once, repeated findings cut."""

    def __init__(self, wud: WorkunitDir, out_sizes: dict[str, float | None], out: list[Finding]) -> None:
        self.wud, self.out_sizes, self.out = wud, out_sizes, out
        self.checked: dict[str, Finding | None] = {}
        self.jobs_checked: dict[str, list[Finding]] = {}
        self.repeats: Counter[str] = Counter()

    def add(self, key: str, finding: Finding) -> None:
        self.repeats[key] += 1
        if self.repeats[key] <= MAX_REPEATS:
            self.out.append(finding)

    def check(self, rec: WorkunitRecord) -> None:
        where = f"workunit {rec.name}"
        names = [f.open_name for f in rec.files]
        expected = list(self.wud.open_names)
        if names != expected:
            self.add("names", error(where, f"files {names} do not match the template's {expected}"))
        for f in rec.files:
            if f.physical_name not in self.checked:
                self.checked[f.physical_name] = self._staged_problem(f, where)
            if (problem := self.checked[f.physical_name]) is not None:
                self.add("file", problem)
            if f.open_name != JOB_OPEN_NAME:
                continue
            if f.physical_name not in self.jobs_checked:
                self.jobs_checked[f.physical_name] = (
                    _check_wu_job(self.wud.download / f.physical_name, set(names), self.out_sizes)
                    if problem is None
                    else []
                )
            for jf in self.jobs_checked[f.physical_name]:
                self.add(
                    "job:" + jf.place + jf.message,
                    Finding(f"{where}.{jf.place}", jf.message, jf.severity, jf.hint),
                )

    def _staged_problem(self, f: StagedFile, where: str) -> Finding | None:
        """What is wrong with the staged copy of ``f`` (missing, size or md5), or None."""
        staged = self.wud.download / f.physical_name
        if not staged.is_file():
            return error(f"{where}.{f.open_name}", f"staged file download/{f.physical_name} is missing")
        md5, size = md5_file(staged)
        if size != f.nbytes:
            return error(
                f"{where}.{f.open_name}",
                f"download/{f.physical_name} has {size} bytes, the record says {f.nbytes}",
            )
        if md5 != f.md5:
            return error(
                f"{where}.{f.open_name}",
                f"download/{f.physical_name} md5 {md5} differs from the record's {f.md5}",
                hint="a staged file was changed; make the workunits again",
            )
        return None


def _check_wu_job(path: Path, open_names: set[str], out_sizes: dict[str, float | None]) -> list[Finding]:
    findings = check_job_file(path)
    if has_errors(findings):
        return findings
    job, _ = parse_job(read_bytes(path, what="vm job file"))
    for f in job.input_files:
        if f.open_name not in open_names:
            findings.append(error(f"vm_job.input_file.{f.open_name}", "is not among the workunit's files"))
    if job.package is not None and job.package.file_name not in open_names:
        findings.append(
            error("vm_job.package", f"{job.package.file_name!r} is not among the workunit's files")
        )
    job_outs = {o.open_name: o for o in job.output_files}
    if out_sizes and set(job_outs) != set(out_sizes):
        findings.append(
            error(
                "vm_job.output_file",
                f"outputs {sorted(job_outs)} differ from the output template's {sorted(out_sizes)}",
            )
        )
    for name, o in job_outs.items():
        limit = out_sizes.get(name)
        if limit is not None and o.max_nbytes is not None and o.max_nbytes > limit:
            findings.append(
                error(
                    f"vm_job.output_file.{name}.max_nbytes",
                    f"{o.max_nbytes} is above the output template's {limit:g}",
                )
            )
    return findings
