"""Checking a made app version directory (``validate`` on one): version.xml, the vm job defaults,
the image files and their md5s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from boincvm.appversion.model import AppVersionFile, VersionXml
from boincvm.appversion.model import (
    API_VERSION,
    LEGACY_SUMMARY_NAME,
    SUMMARY_NAME,
    parse_version_xml,
    read_summary,
    summary_path,
)
from boincvm.appversion.plan_class import ENTRY_NAME as PLAN_CLASS_ENTRY
from boincvm.appversion.plan_class import FILE_NAME as PLAN_CLASS_FILE
from boincvm.appversion.plan_class import check_plan_class_spec
from boincvm.appversion.vmware import check_vmware_app_version
from boincvm.appversion.wrapper_runtime import launcher_problem
from boincvm.appversion.wsl import check_wsl_app_version, is_wsl_app_version
from boincvm.errors import BoincvmError
from boincvm.findings import Finding, error, has_errors, info, warning
from boincvm.hashing import md5_file
from boincvm.hypervisor.base import BackendKind
from boincvm.hypervisor.qemu.runtime import archive_problem
from boincvm.job import (
    DEFAULTS_OPEN_NAME,
    parse_job,
    validate_job,
)
from boincvm.xmlio import read_bytes


def check_app_version(path: Path) -> list[Finding]:
    """Findings for an app version directory (or its version.xml)."""
    directory = path if path.is_dir() else path.parent
    try:
        vx, out = parse_version_xml(read_bytes(directory / "version.xml", what="version.xml"))
    except Exception as exc:  # noqa: BLE001 - every boincvm error becomes a finding here
        if isinstance(exc, BoincvmError):
            return [error("version.xml", exc.message, exc.hint)]
        raise
    out += _check_main_program(vx) + _check_api_version(vx)
    logical, found = _files_by_logical_name(directory, vx.files)
    out += found
    if not vx.is_wrapper:
        out.append(
            warning(
                "version.is_wrapper",
                "is missing",
                hint="add <is_wrapper/> so the client runs the wrapper at normal priority",
            )
        )
    out += _check_defaults(directory, logical, vx.files)
    # A Windows app version through WSL: its main program is wsl_wrapper.exe, its Linux one `main`.
    summary = read_summary(directory) or {}
    wsl = is_wsl_app_version(vx.files, summary)
    if wsl:
        out += check_wsl_app_version(directory, vx.files, summary, _plan_class_of(directory))
    out += _check_plan_class(directory, logical, wsl=wsl)
    problem = launcher_problem(directory, vx.files)
    if problem:
        out.append(error("version.file.main_program", problem, hint="package the app version again"))
    out += _check_strays(directory, vx.files)
    if not has_errors(out):
        out += _check_recorded_files(directory)
    return out


def _check_main_program(vx: VersionXml) -> list[Finding]:
    mains = [f for f in vx.files if f.main_program]
    if len(vx.files) > 1 and len(mains) != 1:
        return [
            error(
                "version.file.main_program",
                f"{len(mains)} files are marked <main_program/>; exactly one must be",
            )
        ]
    return []


def _check_api_version(vx: VersionXml) -> list[Finding]:
    """An ``api_version`` of 7 or more: the client then uses the memory-mapped channel."""
    if vx.api_version is None:
        return [
            error(
                "version.api_version",
                "is missing",
                hint=f"add <api_version>{API_VERSION}</api_version> so the client uses the mmap channel",
            )
        ]
    try:
        major = int(vx.api_version.split(".")[0])
    except ValueError:
        major = 0
    if major < 7:
        return [
            error(
                "version.api_version",
                f"{vx.api_version} is below 7",
                hint="the client uses the memory-mapped channel only with api_version >= 7",
            )
        ]
    return []


def _files_by_logical_name(
    directory: Path, files: Sequence[AppVersionFile]
) -> tuple[dict[str, str], list[Finding]]:
    """logical -> physical name of the files version.xml lists, with findings on each file:
    in the directory, its logical name used once, signed."""
    out: list[Finding] = []
    logical: dict[str, str] = {}
    for f in files:
        if not (directory / f.physical_name).is_file():
            out.append(error(f"version.file.{f.physical_name}", "the file is not in the directory"))
        if f.logical_name:
            if f.logical_name in logical:
                out.append(
                    error(f"version.file.{f.physical_name}.logical_name", f"{f.logical_name!r} is used twice")
                )
            logical[f.logical_name] = f.physical_name
        sig = directory / f"{f.physical_name}.sig"
        if not sig.exists():
            out.append(info(f"version.file.{f.physical_name}", "no .sig file; update_versions will sign it"))
    return logical, out


def _check_defaults(
    directory: Path, logical: dict[str, str], files: Sequence[AppVersionFile]
) -> list[Finding]:
    """The vm job defaults: present, a valid job, naming this app version's files."""
    if DEFAULTS_OPEN_NAME not in logical:
        return [
            error(
                f"version.file[{DEFAULTS_OPEN_NAME}]",
                "no file has this logical name",
                hint="the wrapper reads the image and VM settings from it",
            )
        ]
    defaults_path = directory / logical[DEFAULTS_OPEN_NAME]
    if not defaults_path.is_file():
        return []  # reported with the files
    job, findings = parse_job(defaults_path.read_bytes(), what=defaults_path.name)
    out = [
        Finding(f"{DEFAULTS_OPEN_NAME}:{f.place}", f.message, f.severity, f.hint)
        for f in findings + validate_job(job)
    ]
    for name in ("vm_image", "vm_kernel", "vm_initrd"):
        value = getattr(job, name)
        if value is not None and value not in logical:
            out.append(
                error(
                    f"{DEFAULTS_OPEN_NAME}:vm_job.{name}",
                    f"{value!r} is not a logical name of this app version",
                )
            )
    if not job.vm_image and not job.vm_kernel:
        out.append(error(f"{DEFAULTS_OPEN_NAME}:vm_job.vm_image", "the defaults name no image"))
    out += _check_runtime(directory, {o.name: o.value for o in job.backend_options}, logical, files)
    if job.image_files or job.backend == BackendKind.VMWARE:
        out += check_vmware_app_version(directory, job, logical)
    return out


def _check_recorded_files(directory: Path) -> list[Finding]:
    """Every file still has the md5 and size package-image recorded (app version files are immutable)."""
    summary = summary_path(directory)
    if not summary.is_file():
        return []
    out: list[Finding] = []
    try:
        recorded = {f["physical_name"]: f for f in json.loads(summary.read_text())["files"]}
    except (ValueError, KeyError, TypeError):
        out.append(warning(summary.name, "is not readable"))
        recorded = {}
    for phys, rec in recorded.items():
        p = directory / phys
        if p.is_file():
            md5, size = md5_file(p)
            if (md5, size) != (rec.get("md5"), rec.get("nbytes")):
                out.append(
                    error(
                        f"version.file.{phys}",
                        "md5 or size differs from what package-image recorded",
                        hint="app version files are immutable: make a new version instead",
                    )
                )
    return out


def _check_strays(directory: Path, files: Sequence[AppVersionFile]) -> list[Finding]:
    """Files ``update_versions`` would register although version.xml does not name them.

    update_versions makes every file of the directory an app-version file except version.xml,
    ``*.sig``, directories and dot-names: a stray file is downloaded by every volunteer, and
    one whose name recurs in every app version (as older boincvm summaries did) makes the
    project refuse the second app version ("BOINC files are immutable").
    """
    named = {f.physical_name for f in files}
    out: list[Finding] = []
    for p in sorted(directory.iterdir()):
        name = p.name
        if name in named or name == "version.xml" or name.startswith(".") or name.endswith(".sig"):
            continue
        if name == PLAN_CLASS_FILE or p.is_dir():
            continue
        hint = (
            f"rename it {SUMMARY_NAME} (a dot-name update_versions skips)"
            if name == LEGACY_SUMMARY_NAME
            else "remove it, or name it in version.xml if the task needs it"
        )
        out.append(
            error(
                name,
                "is not named in version.xml: update_versions would ship it to every volunteer",
                hint=hint,
            )
        )
    return out


def _plan_class_of(directory: Path) -> str | None:
    """The app version's plan class: package-image's summary says it, else the directory name
    (BOINC's ``PLATFORM__PLAN_CLASS``)."""
    plan_class = (read_summary(directory) or {}).get("plan_class")
    if isinstance(plan_class, str):
        return plan_class
    _, sep, plan_class = directory.name.partition("__")
    return plan_class if sep and plan_class else None


def _check_plan_class(directory: Path, logical: dict[str, str], *, wsl: bool) -> list[Finding]:
    """The plan_class_spec.xml entry package-image wrote, against the app version (``wsl``: one
    that runs through WSL) and its job defaults."""
    spec_path = directory / PLAN_CLASS_ENTRY
    plan_class = _plan_class_of(directory)
    if not spec_path.exists():
        if plan_class is None:
            return []
        if (directory / PLAN_CLASS_FILE).exists():
            return [
                error(
                    PLAN_CLASS_FILE,
                    "update_versions would ship it to every volunteer as an app-version file",
                    hint=f"rename it {PLAN_CLASS_ENTRY} (update_versions skips dot-names) or move it out",
                )
            ]
        return [
            warning(
                PLAN_CLASS_ENTRY,
                f"is missing: the scheduler will not know where plan class {plan_class!r} can run",
                hint="package-image --plan-class writes it",
            )
        ]
    try:
        data = read_bytes(spec_path, what=PLAN_CLASS_ENTRY)
    except BoincvmError as exc:
        return [error(PLAN_CLASS_ENTRY, exc.message, exc.hint)]
    job = None
    defaults = directory / logical.get(DEFAULTS_OPEN_NAME, DEFAULTS_OPEN_NAME)
    if DEFAULTS_OPEN_NAME in logical and defaults.is_file():
        job, findings = parse_job(defaults.read_bytes(), what=defaults.name)
        job = None if has_errors(findings) else job  # reported above already
    return check_plan_class_spec(data, plan_class=plan_class, job=job, wsl=wsl)


def _check_runtime(
    directory: Path, options: dict[str, str], logical: dict[str, str], files: Sequence[AppVersionFile]
) -> list[Finding]:
    """The bundled QEMU runtime the defaults name: a file of this app version, signed when
    the others are, and a well-formed runtime archive."""
    name = options.get("runtime")
    if not name:
        return []
    place = f"{DEFAULTS_OPEN_NAME}:vm_job.backend_option[runtime]"
    if name not in logical:
        return [error(place, f"{name!r} is not a logical name of this app version")]
    physical = logical[name]
    out: list[Finding] = []
    signed = [f for f in files if (directory / f"{f.physical_name}.sig").exists()]
    if signed and not (directory / f"{physical}.sig").exists():
        out.append(error(f"version.file.{physical}", "the QEMU runtime is not signed, but other files are"))
    if (directory / physical).is_file():
        problem = archive_problem(directory / physical)
        if problem:
            out.append(
                error(
                    f"version.file.{physical}",
                    f"the QEMU runtime archive is damaged: {problem}",
                    hint="package the app version again",
                )
            )
    return out
