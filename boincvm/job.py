"""The vm job: what the wrapper installs, runs, copies in and out, and how the VM looks.

A vm job file (root ``<vm_job>``) exists at two levels: the app version ships job
*defaults* (the image, memory, guest directories) and each workunit ships a job with the
program to run. :meth:`VmJob.merged` lays the workunit job over the defaults and
:func:`resolve` turns the result into a :class:`ResolvedJob` with every value concrete.

The vocabulary borrows BOINC's ``job.xml`` (wrapper) and ``vbox_job.xml`` (vboxwrapper)
names wherever they mean the same thing; the README documents every element.

Parsing goes through :mod:`boincvm.xmlio` (no DTD, no entities). :func:`parse_job`
returns the job and the findings; :func:`load_job` raises on the first error.
"""

from __future__ import annotations

import enum
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from boincvm.bounds import number_problem
from boincvm.errors import BoincvmError, XmlError
from boincvm.findings import Finding, error, errors_in, has_errors, warning
from boincvm.hypervisor.base import BackendKind, backend_class
from boincvm.names import guest_path_problem, logical_name_problem, relative_path_problem
from boincvm.xmlio import is_flag_true, parse_xml, read_bytes, text_of

#: The backend names a job may give (BackendKind's values, in its order).
_BACKENDS = tuple(k.value for k in BackendKind)
ROOT = "vm_job"

#: Logical name of the workunit's job file in the slot.
JOB_OPEN_NAME = "vm_job.xml"
#: Logical name of the app version's job defaults in the slot.
DEFAULTS_OPEN_NAME = "vm_job_defaults.xml"


class CpuTimeSource(enum.StrEnum):
    """Which CPU time the wrapper claims: the host's hypervisor processes, or the guest's own count."""

    HOST = "host"
    GUEST = "guest"


class CheckpointMode(enum.StrEnum):
    """How the wrapper checkpoints: VM snapshots, or just the program's own checkpoint files."""

    VM = "vm"
    APP = "app"


class PackageKind(enum.StrEnum):
    """How a guest package is installed."""

    RPM = "rpm"
    TAR = "tar"

    @classmethod
    def from_filename(cls, name: str) -> PackageKind | None:
        """Guess the kind from a file name, or None."""
        lower = name.lower()
        if lower.endswith(".rpm"):
            return cls.RPM
        if lower.endswith((".tar.gz", ".tgz", ".tar")):
            return cls.TAR
        return None


@dataclass(frozen=True)
class InputFile:
    """A workunit input copied into the guest before the program starts.

    ``open_name`` is the logical name in the slot; ``guest_name`` the path relative to the
    task's ``exec_dir`` in the guest (defaults to ``open_name``).
    """

    open_name: str
    guest_name: str | None = None

    @property
    def guest_path(self) -> str:
        """The guest-side name, relative to exec_dir."""
        return self.guest_name or self.open_name


@dataclass(frozen=True)
class OutputFile:
    """A result copied out of the guest after the program ends.

    The guest file (``guest_name`` relative to ``exec_dir``, default ``open_name``) is
    copied to the slot file the logical ``open_name`` resolves to. Larger than
    ``max_nbytes`` is an error; a missing file is one unless ``optional``.
    """

    open_name: str
    max_nbytes: int | None = None
    guest_name: str | None = None
    optional: bool = False

    @property
    def guest_path(self) -> str:
        """The guest-side name, relative to exec_dir."""
        return self.guest_name or self.open_name


@dataclass(frozen=True)
class Package:
    """The guest package (RPM or tarball) a workunit ships: its logical name and kind."""

    file_name: str
    kind: PackageKind | None = None

    @property
    def resolved_kind(self) -> PackageKind | None:
        """The declared kind, else the one the file name suggests."""
        return self.kind or PackageKind.from_filename(self.file_name)


@dataclass(frozen=True)
class ImageFile:
    """One file of a multi-file image (a VMware VM directory shipped as app-version files).

    ``open_name`` is its logical name in the slot; ``file_name`` the name (a relative path)
    it must have in the VM directory the backend rebuilds, because the image's own files
    refer to each other by these names (the .vmx names its disks, a descriptor its extents).
    """

    open_name: str
    file_name: str


@dataclass(frozen=True)
class BackendOption:
    """One setting for the backend (QEMU's ``machine``, VMware's ``guest_user`` ...), as text.

    Each backend names and checks its own (``Backend.check_options``); the README lists them.
    """

    name: str
    value: str


@dataclass(frozen=True)
class Task:
    """The program run in the guest and the files through which it reports progress."""

    application: str | None = None
    command_line: str | None = None
    exec_dir: str | None = None
    setenv: tuple[str, ...] = ()
    fraction_done_filename: str | None = None
    credit_report_filename: str | None = None
    completion_trigger_file: str | None = None
    temporary_exit_trigger_file: str | None = None
    time_limit: float | None = None


@dataclass(frozen=True)
class VmJob:
    """A parsed vm job file; ``None`` means "not said here" (a default or the other level decides)."""

    backend: str | None = None
    vm_image: str | None = None
    vm_kernel: str | None = None
    vm_initrd: str | None = None
    kernel_cmdline: str | None = None
    memory_size_mb: int | None = None
    ncpus: int | None = None
    enable_network: bool | None = None
    minimum_checkpoint_interval: float | None = None
    disable_automatic_checkpoints: bool | None = None
    #: The VM must run with hardware acceleration (KVM for QEMU); BOINC's plan-class name.
    vm_accel_required: bool | None = None
    boot_timeout: float | None = None
    cpu_time_source: CpuTimeSource | None = None
    package: Package | None = None
    task: Task | None = None
    input_files: tuple[InputFile, ...] = ()
    output_files: tuple[OutputFile, ...] = ()
    image_files: tuple[ImageFile, ...] = ()
    backend_options: tuple[BackendOption, ...] = ()
    checkpoint_mode: CheckpointMode | None = None
    checkpoint_files: tuple[str, ...] = ()

    def merged(self, over: VmJob) -> VmJob:
        """This job (defaults) with every value ``over`` states laid on top.

        Scalars and the package: ``over`` wins where it says something. The task merges
        field by field. File lists: ``over``'s list replaces ours when it is not empty.
        Backend options merge by name, ``over``'s value winning.
        """
        values: dict[str, Any] = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(over, f.name)
            if f.name == "task":
                values[f.name] = _merge_task(mine, theirs)
            elif f.name == "backend_options":
                by_name = {o.name: o for o in mine} | {o.name: o for o in theirs}
                values[f.name] = tuple(by_name.values())
            elif isinstance(mine, tuple):
                values[f.name] = theirs or mine
            else:
                values[f.name] = mine if theirs is None else theirs
        return VmJob(**values)


def _merge_task(base: Task | None, over: Task | None) -> Task | None:
    if base is None or over is None:
        return over or base
    values: dict[str, Any] = {}
    for f in fields(base):
        mine, theirs = getattr(base, f.name), getattr(over, f.name)
        values[f.name] = (theirs or mine) if isinstance(mine, tuple) else (mine if theirs is None else theirs)
    return Task(**values)


# -- defaults and the resolved job ---------------------------------------------------------

DEFAULT_MEMORY_MB = 512
#: Room for the guest's writes into the overlay beyond the checkpoints' memory images.
CHECKPOINT_DISK_MARGIN_MB = 256


def checkpoint_disk_mb(memory_mb: int) -> int:
    """Disk a VM of ``memory_mb`` may take in its slot: two checkpoints of all its memory
    (the new one is taken before the old one is dropped) plus the margin for its writes."""
    return 2 * memory_mb + CHECKPOINT_DISK_MARGIN_MB


DEFAULT_NCPUS = 1
DEFAULT_CHECKPOINT_INTERVAL = 600.0
DEFAULT_BOOT_TIMEOUT = 120.0
DEFAULT_EXEC_DIR = "/tmp/boincvm"


@dataclass(frozen=True)
class ResolvedJob:
    """A complete job, every value concrete: what the wrapper runs."""

    backend: str
    vm_image: str | None
    vm_kernel: str | None
    vm_initrd: str | None
    kernel_cmdline: str
    memory_size_mb: int
    ncpus: int
    enable_network: bool
    minimum_checkpoint_interval: float
    disable_automatic_checkpoints: bool
    boot_timeout: float
    cpu_time_source: CpuTimeSource
    package: Package | None
    application: str
    command_line: str
    exec_dir: str
    setenv: tuple[tuple[str, str], ...]
    fraction_done_filename: str | None
    credit_report_filename: str | None
    completion_trigger_file: str | None
    temporary_exit_trigger_file: str | None
    time_limit: float | None
    input_files: tuple[InputFile, ...]
    output_files: tuple[OutputFile, ...]
    image_files: tuple[ImageFile, ...] = ()
    backend_options: tuple[tuple[str, str], ...] = ()
    vm_accel_required: bool = False
    checkpoint_mode: CheckpointMode = CheckpointMode.VM
    checkpoint_files: tuple[str, ...] = ()

    def guest_path(self, name: str) -> str:
        """A guest path: absolute names stay, relative ones are taken from ``exec_dir``."""
        return name if name.startswith("/") else f"{self.exec_dir.rstrip('/')}/{name}"


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
        memory_size_mb=job.memory_size_mb or DEFAULT_MEMORY_MB,
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


# -- parsing -------------------------------------------------------------------------------

_SCALARS: dict[str, Callable[[str], Any]] = {
    "backend": str,
    "vm_image": str,
    "vm_kernel": str,
    "vm_initrd": str,
    "kernel_cmdline": str,
    "memory_size_mb": int,
    "ncpus": int,
    "minimum_checkpoint_interval": float,
    "boot_timeout": float,
    "cpu_time_source": CpuTimeSource,
    "checkpoint_mode": CheckpointMode,
}
_FLAGS = ("enable_network", "disable_automatic_checkpoints", "vm_accel_required")
_TASK_SCALARS: dict[str, Callable[[str], Any]] = {
    "application": str,
    "command_line": str,
    "exec_dir": str,
    "fraction_done_filename": str,
    "credit_report_filename": str,
    "completion_trigger_file": str,
    "temporary_exit_trigger_file": str,
    "time_limit": float,
}
#: Text elements whose surrounding whitespace is significant and kept.
_VERBATIM = ("command_line", "kernel_cmdline")


def _convert(place: str, elem: ET.Element, conv: Callable[[str], Any], findings: list[Finding]) -> Any:
    raw = (elem.text or "") if elem.tag in _VERBATIM else text_of(elem)
    if elem.tag in _VERBATIM:
        raw = raw.strip("\n")
    if conv is str:
        return raw
    try:
        value = conv(raw)
    except ValueError:
        kind = {int: "a whole number", float: "a number"}.get(conv)  # type: ignore[call-overload]
        if kind is None and isinstance(conv, type) and issubclass(conv, enum.Enum):
            kind = "one of " + ", ".join(str(m.value) for m in conv)
        findings.append(error(place, f"{raw!r} is not {kind or 'valid'}", hint=_VALUE_HINT))
        return None
    # float() accepts nan, inf and 1e999 (inf): refused here, before any comparison or int().
    if isinstance(value, float) and (problem := number_problem(value)):
        findings.append(error(place, f"{raw!r} {problem}", hint=_VALUE_HINT))
        return None
    return value


_NAME_HINT = "give a plain file name: no '/', no '..', no control characters"
_PATH_HINT = "give a path relative to the job's directory, without '..' or control characters"
_VALUE_HINT = "write a finite number (no nan, inf or 1e999) or the value the README lists"


def _flag(place: str, elem: ET.Element, findings: list[Finding]) -> bool | None:
    value = is_flag_true(elem)
    if value is None:
        findings.append(
            error(place, f"{text_of(elem)!r} is not a flag", hint="write <x/> for true, <x>0</x> for false")
        )
    return value


def parse_job(data: bytes | str, *, what: str = "vm job file") -> tuple[VmJob, list[Finding]]:
    """Parse a vm job document into a :class:`VmJob` plus findings (unknown elements, bad values).

    Structural problems of the values are findings; the document itself must be XML.

    Raises:
        XmlError: not well-formed, unsafe (DTD/entities), or the root is not ``<vm_job>``.
    """
    root = parse_xml(data, what=what)
    if root.tag != ROOT:
        raise XmlError(
            f"{what} has root element <{root.tag}>, expected <{ROOT}>",
            hint="a vm job file starts with <vm_job>; see the README's vm job format",
        )
    findings: list[Finding] = []
    values: dict[str, Any] = {}
    inputs: list[InputFile] = []
    outputs: list[OutputFile] = []
    images: list[ImageFile] = []
    options: list[BackendOption] = []
    checkpoint_files: list[str] = []
    seen: set[str] = set()
    for child in root:
        tag = child.tag
        place = f"{ROOT}.{tag}"
        if tag in seen and tag not in (
            "input_file",
            "output_file",
            "image_file",
            "backend_option",
            "checkpoint_file",
        ):
            findings.append(error(place, "appears more than once"))
        seen.add(tag)
        if tag in _SCALARS:
            values[tag] = _convert(place, child, _SCALARS[tag], findings)
        elif tag in _FLAGS:
            values[tag] = _flag(place, child, findings)
        elif tag == "package":
            values[tag] = _parse_package(child, findings)
        elif tag == "task":
            values[tag] = _parse_task(child, findings)
        elif tag == "input_file":
            item = _parse_file(child, f"{place}[{len(inputs)}]", findings, output=False)
            if isinstance(item, InputFile):
                inputs.append(item)
        elif tag == "output_file":
            item = _parse_file(child, f"{place}[{len(outputs)}]", findings, output=True)
            if isinstance(item, OutputFile):
                outputs.append(item)
        elif tag == "image_file":
            image = _parse_image_file(child, f"{place}[{len(images)}]", findings)
            if image is not None:
                images.append(image)
        elif tag == "checkpoint_file":
            checkpoint_files.append(text_of(child))
        elif tag == "backend_option":
            option = _parse_backend_option(child, f"{place}[{len(options)}]", findings)
            if option is not None:
                options.append(option)
        else:
            findings.append(
                warning(place, "unknown element, ignored", hint="check the spelling against the README")
            )
    job = VmJob(
        **values,
        input_files=tuple(inputs),
        output_files=tuple(outputs),
        image_files=tuple(images),
        backend_options=tuple(options),
        checkpoint_files=tuple(checkpoint_files),
    )
    return job, findings


def _parse_package(elem: ET.Element, findings: list[Finding]) -> Package | None:
    place = f"{ROOT}.package"
    name: str | None = None
    kind: PackageKind | None = None
    if len(elem) == 0:  # <package>name.rpm</package>
        name = text_of(elem)
    for child in elem:
        if child.tag == "file_name":
            name = text_of(child)
        elif child.tag == "kind":
            kind = _convert(f"{place}.kind", child, PackageKind, findings)
        else:
            findings.append(warning(f"{place}.{child.tag}", "unknown element, ignored"))
    if name is None:
        findings.append(error(f"{place}.file_name", "is missing"))
        return None
    return Package(file_name=name, kind=kind)


def _parse_task(elem: ET.Element, findings: list[Finding]) -> Task:
    values: dict[str, Any] = {}
    setenv: list[str] = []
    for child in elem:
        place = f"{ROOT}.task.{child.tag}"
        if child.tag in _TASK_SCALARS:
            if child.tag in values:
                findings.append(error(place, "appears more than once"))
            values[child.tag] = _convert(place, child, _TASK_SCALARS[child.tag], findings)
        elif child.tag == "setenv":
            setenv.append(text_of(child))
        else:
            findings.append(
                warning(place, "unknown element, ignored", hint="check the spelling against the README")
            )
    return Task(**values, setenv=tuple(setenv))


def _parse_file(
    elem: ET.Element, place: str, findings: list[Finding], *, output: bool
) -> InputFile | OutputFile | None:
    values: dict[str, Any] = {}
    for child in elem:
        cplace = f"{place}.{child.tag}"
        if child.tag in ("open_name", "guest_name"):
            values[child.tag] = text_of(child)
        elif output and child.tag == "max_nbytes":
            num = _convert(cplace, child, float, findings)
            values["max_nbytes"] = None if num is None else int(num)
        elif output and child.tag == "optional":
            values["optional"] = bool(_flag(cplace, child, findings))
        else:
            findings.append(warning(cplace, "unknown element, ignored"))
    if "open_name" not in values:
        findings.append(error(f"{place}.open_name", "is missing"))
        return None
    return OutputFile(**values) if output else InputFile(**values)


def _child_texts(
    elem: ET.Element, place: str, findings: list[Finding], names: tuple[str, ...], required: tuple[str, ...]
) -> dict[str, str] | None:
    """The text of each child named in ``names``; None (with errors) when a required one is missing."""
    values: dict[str, str] = {}
    for child in elem:
        if child.tag in names:
            values[child.tag] = text_of(child)
        else:
            findings.append(warning(f"{place}.{child.tag}", "unknown element, ignored"))
    missing = [name for name in required if name not in values]
    for name in missing:
        findings.append(error(f"{place}.{name}", "is missing"))
    return None if missing else values


def _parse_image_file(elem: ET.Element, place: str, findings: list[Finding]) -> ImageFile | None:
    names = ("open_name", "file_name")
    values = _child_texts(elem, place, findings, names, names)
    return None if values is None else ImageFile(**values)


def _parse_backend_option(elem: ET.Element, place: str, findings: list[Finding]) -> BackendOption | None:
    values = _child_texts(elem, place, findings, ("name", "value"), ("name",))
    return None if values is None else BackendOption(name=values["name"], value=values.get("value", ""))


def load_job(path: Path) -> VmJob:
    """Read a vm job file and fail on its first error.

    Raises:
        InputError: the file cannot be read.
        XmlError: it is not a valid vm job.
    """
    job, findings = parse_job(read_bytes(path, what="vm job file"), what=f"vm job file {path.name}")
    findings += validate_job(job)
    bad = errors_in(findings)
    if bad:
        raise XmlError(f"vm job file {path.name}: {bad[0]}", hint=bad[0].hint)
    return job


# -- validation ------------------------------------------------------------------------------


def validate_job(job: VmJob, *, complete: bool = False) -> list[Finding]:
    """Check a job's values; with ``complete`` also that it can run (task, image present).

    Returns findings, each naming its place; never raises.
    """
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
    if job.memory_size_mb is not None and not 32 <= job.memory_size_mb <= 1024 * 1024:
        out.append(
            error(f"{p}.memory_size_mb", f"{job.memory_size_mb} is outside 32..1048576", hint="give MiB")
        )
    if job.ncpus is not None and not 1 <= job.ncpus <= 256:
        out.append(error(f"{p}.ncpus", f"{job.ncpus} is outside 1..256", hint="give 1 to 256 CPUs"))
    # A job built from options (not parsed) may carry NaN or infinities too: checked here.
    ranges = (("minimum_checkpoint_interval", 0.0, False), ("boot_timeout", 0.0, True))
    for name, low, low_open in ranges:
        value = getattr(job, name)
        if value is not None and (problem := number_problem(value, low=low, low_open=low_open)):
            out.append(error(f"{p}.{name}", problem, hint="give a finite number of seconds"))
    if job.package is not None:
        if problem := logical_name_problem(job.package.file_name):
            out.append(error(f"{p}.package.file_name", problem, hint=_NAME_HINT))
        elif job.package.resolved_kind is None:
            out.append(
                error(
                    f"{p}.package.kind",
                    "cannot tell rpm from tar",
                    hint="add <kind>rpm</kind> or <kind>tar</kind>",
                )
            )
    if job.task is not None:
        out.extend(_validate_task(job.task))
    out.extend(_validate_files(job))
    out.extend(_validate_image_files(job))
    out.extend(_validate_backend_options(job, complete=complete))
    if job.vm_accel_required and any(o.name == "accel" and o.value == "tcg" for o in job.backend_options):
        out.append(
            error(
                f"{p}.vm_accel_required",
                "contradicts backend_option accel=tcg",
                hint="drop one of them: KVM is either required or never used",
            )
        )
    out.extend(_validate_checkpoint_files(job, complete=complete))
    if complete:
        if job.task is None or not job.task.application:
            out.append(
                error(f"{p}.task.application", "must not be empty", hint="say which program the guest runs")
            )
        if not job.vm_image and not job.vm_kernel:
            out.append(
                error(
                    f"{p}.vm_image",
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


# -- rendering -------------------------------------------------------------------------------


def render_job(job: VmJob) -> str:
    """Render a job as a vm job XML document (see ``templates/vm_job.xml.j2``)."""
    # Imported here: the wrapper parses jobs but never renders one, and jinja2 is not part of
    # the wrapper (zip application or frozen executable); tests/unit/test_layout.py allows it.
    from boincvm.render import render

    return render("vm_job.xml.j2", job=job)


def with_task(job: VmJob, **changes: Any) -> VmJob:
    """A copy of ``job`` whose task has ``changes`` applied."""
    return replace(job, task=replace(job.task or Task(), **changes))
