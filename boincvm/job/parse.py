"""Reading vm job XML: :func:`parse_job` returns the job and the findings, :func:`load_job`
reads a file and raises on its first error.

Parsing goes through :mod:`boincvm.xmlio` (no DTD, no entities).
"""

from __future__ import annotations

import enum
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boincvm.bounds import number_problem
from boincvm.errors import XmlError
from boincvm.findings import Finding, error, errors_in, warning
from boincvm.job.model import (
    MEMORY_TAG,
    ROOT,
    BackendOption,
    CheckpointMode,
    CpuTimeSource,
    ImageFile,
    InputFile,
    OutputFile,
    Package,
    PackageKind,
    Task,
    VmJob,
)
from boincvm.job.validate import validate_job
from boincvm.xmlio import is_flag_true, parse_xml, read_bytes, text_of

_SCALARS: dict[str, Callable[[str], Any]] = {
    "backend": str,
    "vm_image": str,
    "vm_kernel": str,
    "vm_initrd": str,
    "kernel_cmdline": str,
    MEMORY_TAG: int,
    "ncpus": int,
    "minimum_checkpoint_interval": float,
    "boot_timeout": float,
    "cpu_time_source": CpuTimeSource,
    "checkpoint_mode": CheckpointMode,
}
#: Tags whose value has another name in :class:`VmJob`.
_FIELD_OF_TAG = {MEMORY_TAG: "memory_mb"}
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


_VALUE_HINT = "write a finite number (no nan, inf or 1e999) or the value docs/vm-job.md lists"


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
            hint="a vm job file starts with <vm_job>; see docs/vm-job.md",
        )
    findings: list[Finding] = []
    parts = _JobParts()
    seen: set[str] = set()
    for child in root:
        place = f"{ROOT}.{child.tag}"
        if child.tag in seen and child.tag not in _REPEATED:
            findings.append(error(place, "appears more than once"))
        seen.add(child.tag)
        if not (parts.take_single(child, place, findings) or parts.take_repeated(child, place, findings)):
            findings.append(
                warning(place, "unknown element, ignored", hint="check the spelling against docs/vm-job.md")
            )
    return parts.job(), findings


#: Elements a job may hold several of.
_REPEATED = ("input_file", "output_file", "image_file", "backend_option", "checkpoint_file")


@dataclass
class _JobParts:
    """What the elements read so far say, until they become a :class:`VmJob`."""

    values: dict[str, Any] = field(default_factory=dict)
    inputs: list[InputFile] = field(default_factory=list)
    outputs: list[OutputFile] = field(default_factory=list)
    images: list[ImageFile] = field(default_factory=list)
    options: list[BackendOption] = field(default_factory=list)
    checkpoint_files: list[str] = field(default_factory=list)

    def take_single(self, child: ET.Element, place: str, findings: list[Finding]) -> bool:
        """Read an element a job holds once (a later one replaces it); False if it is none."""
        tag = child.tag
        if tag in _SCALARS:
            self.values[_FIELD_OF_TAG.get(tag, tag)] = _convert(place, child, _SCALARS[tag], findings)
        elif tag in _FLAGS:
            self.values[tag] = _flag(place, child, findings)
        elif tag == "package":
            self.values[tag] = _parse_package(child, findings)
        elif tag == "task":
            self.values[tag] = _parse_task(child, findings)
        else:
            return False
        return True

    def take_repeated(self, child: ET.Element, place: str, findings: list[Finding]) -> bool:
        """Read an element a job may hold several of; False if it is none."""
        tag = child.tag
        if tag == "input_file":
            item = _parse_file(child, f"{place}[{len(self.inputs)}]", findings, output=False)
            if isinstance(item, InputFile):
                self.inputs.append(item)
        elif tag == "output_file":
            item = _parse_file(child, f"{place}[{len(self.outputs)}]", findings, output=True)
            if isinstance(item, OutputFile):
                self.outputs.append(item)
        elif tag == "image_file":
            image = _parse_image_file(child, f"{place}[{len(self.images)}]", findings)
            if image is not None:
                self.images.append(image)
        elif tag == "checkpoint_file":
            self.checkpoint_files.append(text_of(child))
        elif tag == "backend_option":
            option = _parse_backend_option(child, f"{place}[{len(self.options)}]", findings)
            if option is not None:
                self.options.append(option)
        else:
            return False
        return True

    def job(self) -> VmJob:
        return VmJob(
            **self.values,
            input_files=tuple(self.inputs),
            output_files=tuple(self.outputs),
            image_files=tuple(self.images),
            backend_options=tuple(self.options),
            checkpoint_files=tuple(self.checkpoint_files),
        )


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
                warning(place, "unknown element, ignored", hint="check the spelling against docs/vm-job.md")
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
