"""BOINC's input and output templates, read in one place.

The output template says which result files a task uploads (and which are optional); the
input template carries the workunit's ``rsc_*`` bounds. Everything that reads a template
(run-local, the real-client project, validate) reads it through here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields, replace
from xml.etree import ElementTree as ET

from boincvm.errors import BoincvmError
from boincvm.findings import Finding, error, info
from boincvm.job import DEFAULT_MEMORY_MB, VmJob
from boincvm.xmlio import parse_xml, text_of


@dataclass(frozen=True)
class Resources:
    """The BOINC workunit parameters of the input template (``create_work`` defaults otherwise)."""

    rsc_fpops_est: float = 3600e9
    rsc_fpops_bound: float = 86400e9
    rsc_memory_bound: float = 5e8
    rsc_disk_bound: float = 1e9
    delay_bound: float = 7 * 86400
    min_quorum: int = 1
    target_nresults: int = 1
    max_error_results: int = 3
    max_total_results: int = 5
    max_success_results: int = 1

    @classmethod
    def for_job(
        cls,
        job: VmJob,
        *,
        fpops_est: float | None = None,
        fpops_bound: float | None = None,
        memory_bound: float | None = None,
        disk_bound: float | None = None,
        delay_bound: float | None = None,
        target_nresults: int | None = None,
        min_quorum: int | None = None,
    ) -> Resources:
        """make-workunit's rules: what is not given takes the class's default, except the
        memory bound, which covers the VM (a quarter more than its memory, 512 MB when the
        job names none); the result limits grow with ``target_nresults``."""
        vm_bytes = (job.memory_mb or DEFAULT_MEMORY_MB) * 1024 * 1024
        base = cls()
        replicas = base.target_nresults if target_nresults is None else target_nresults
        return cls(
            rsc_fpops_est=base.rsc_fpops_est if fpops_est is None else fpops_est,
            rsc_fpops_bound=base.rsc_fpops_bound if fpops_bound is None else fpops_bound,
            rsc_memory_bound=memory_bound if memory_bound is not None else vm_bytes * 1.25,
            rsc_disk_bound=base.rsc_disk_bound if disk_bound is None else disk_bound,
            delay_bound=base.delay_bound if delay_bound is None else delay_bound,
            target_nresults=replicas,
            min_quorum=base.min_quorum if min_quorum is None else min_quorum,
            max_success_results=max(1, replicas),
            max_total_results=max(5, 2 * replicas),
            max_error_results=max(3, replicas),
        )


def resources_of(data: bytes) -> Resources:
    """The workunit parameters an input template gives, :class:`Resources`' defaults (which
    are ``create_work``'s) for the rest and for values that are not numbers (``validate``
    reports those).

    Raises:
        InputError: the template is not well-formed XML.
    """
    wu = parse_xml(data, what="input template").find("workunit")
    given = {c.tag: text_of(c) for c in (wu if wu is not None else [])}
    values: dict[str, float | int] = {}
    for f in fields(Resources):
        if f.name in given:
            try:
                number = float(given[f.name])
            except ValueError:
                continue
            values[f.name] = int(number) if f.type in ("int", int) else number
    return replace(Resources(), **values)  # type: ignore[arg-type]  # each typed by its field above


_RESOURCE_PAIRS = (("rsc_fpops_est", "rsc_fpops_bound"),)


def check_input_template(data: bytes, what: str) -> tuple[list[Finding], list[str]]:
    """Findings for an input template, and its open names in order."""
    try:
        root = parse_xml(data, what=f"input template {what}")
    except BoincvmError as exc:
        return [error(what, exc.message, exc.hint)], []
    p = "input_template"
    if root.tag != p:
        return [error(what, f"root element is <{root.tag}>, expected <{p}>")], []
    out: list[Finding] = []
    infos = root.findall("file_info")
    wu = root.find("workunit")
    if wu is None:
        return [error(f"{p}.workunit", "is missing")], []
    refs = wu.findall("file_ref")
    if len(refs) != len(infos):
        out.append(
            error(
                f"{p}.workunit.file_ref", f"{len(refs)} file_ref for {len(infos)} file_info; they must match"
            )
        )
    names: list[str] = []
    for i, ref in enumerate(refs):
        elem = ref.find("open_name")
        if elem is None and ref.find("copy_file") is None:
            out.append(error(f"{p}.workunit.file_ref[{i}].open_name", "is missing"))
        elif elem is not None:
            names.append(text_of(elem))
    for name, n in Counter(names).items():
        if n > 1:
            out.append(
                error(
                    f"{p}.workunit.file_ref.open_name",
                    f"{name!r} appears {n} times; open names must be unique",
                )
            )
    values: dict[str, float] = {}
    for child in wu:
        if child.tag.startswith("rsc_") or child.tag in ("delay_bound",):
            try:
                values[child.tag] = float(text_of(child))
            except ValueError:
                out.append(error(f"{p}.workunit.{child.tag}", f"{text_of(child)!r} is not a number"))
                continue
            if values[child.tag] <= 0:
                out.append(error(f"{p}.workunit.{child.tag}", "must be more than 0"))
    for est, bound in _RESOURCE_PAIRS:
        if est in values and bound in values and values[bound] < values[est]:
            out.append(
                error(
                    f"{p}.workunit.{bound}",
                    f"{values[bound]:g} is below {est} {values[est]:g}",
                    hint="the bound must be at least the estimate",
                )
            )
    for name in ("rsc_fpops_est", "rsc_fpops_bound", "rsc_memory_bound", "rsc_disk_bound"):
        if name not in values:
            out.append(info(f"{p}.workunit.{name}", "not set; create_work's default applies"))
    return out, names


@dataclass(frozen=True)
class ResultFile:
    """One file a task uploads, as the output template says: its open name, ``max_nbytes``
    (None when the template gives none) and whether it is ``<optional/>``."""

    open_name: str
    max_nbytes: float | None
    optional: bool = False


def check_output_template(data: bytes, what: str) -> tuple[list[Finding], dict[str, float | None]]:
    """Findings for an output template, and its open names with their max_nbytes."""
    findings, files = read_output_template(data, what)
    return findings, {f.open_name: f.max_nbytes for f in files}


def read_output_template(data: bytes, what: str) -> tuple[list[Finding], tuple[ResultFile, ...]]:
    """Findings for an output template, and the result files it names (in order)."""
    try:
        root = parse_xml(data, what=f"output template {what}")
    except BoincvmError as exc:
        return [error(what, exc.message, exc.hint)], ()
    p = "output_template"
    if root.tag != p:
        return [error(what, f"root element is <{root.tag}>, expected <{p}>")], ()
    out, by_name = _file_infos(root, p)
    result = root.find("result")
    if result is None:
        return out + [error(f"{p}.result", "is missing")], ()
    refs: dict[str, ET.Element] = {}
    sizes: dict[str, float | None] = {}
    out += _result_refs(result, by_name, p, refs, sizes)
    optional = {name for name, ref in refs.items() if ref.find("optional") is not None}
    return out, tuple(ResultFile(name, size, name in optional) for name, size in sizes.items())


def _file_infos(root: ET.Element, p: str) -> tuple[list[Finding], dict[str, ET.Element]]:
    """Findings for the template's ``<file_info>`` elements, and those elements by name."""
    out: list[Finding] = []
    by_name: dict[str, ET.Element] = {}
    for i, fi in enumerate(root.findall("file_info")):
        key = _name_key(fi.find("name"))
        if not key:
            out.append(error(f"{p}.file_info[{i}].name", "is missing"))
        by_name[key] = fi
        max_nbytes = fi.find("max_nbytes")
        if max_nbytes is None:
            out.append(
                error(
                    f"{p}.file_info[{i}].max_nbytes",
                    "is missing",
                    hint="every output needs <max_nbytes>; the client and upload handler enforce it",
                )
            )
        url = fi.find("url")
        if url is None and fi.find("upload_url") is None:
            out.append(error(f"{p}.file_info[{i}].url", "is missing", hint="add <url><UPLOAD_URL/></url>"))
    return out, by_name


def _result_refs(
    result: ET.Element,
    by_name: dict[str, ET.Element],
    p: str,
    refs: dict[str, ET.Element],
    sizes: dict[str, float | None],
) -> list[Finding]:
    """Findings for ``<result>``'s file_refs; fills ``refs`` (by open name) and their ``sizes``."""
    out: list[Finding] = []
    names: list[str] = []
    for i, ref in enumerate(result.findall("file_ref")):
        key = _name_key(ref.find("file_name"))
        open_name = ref.find("open_name")
        if open_name is None:
            out.append(error(f"{p}.result.file_ref[{i}].open_name", "is missing"))
            continue
        names.append(text_of(open_name))
        refs[text_of(open_name)] = ref
        info_elem = by_name.get(key)
        if info_elem is None:
            out.append(error(f"{p}.result.file_ref[{i}].file_name", "names no file_info"))
            continue
        mx = info_elem.find("max_nbytes")
        if mx is None:
            sizes[text_of(open_name)] = None
            continue
        try:
            sizes[text_of(open_name)] = float(text_of(mx))
        except ValueError:
            out.append(error(f"{p}.file_info.max_nbytes", f"{text_of(mx)!r} is not a number"))
    for name, n in Counter(names).items():
        if n > 1:
            out.append(
                error(
                    f"{p}.result.file_ref.open_name", f"{name!r} appears {n} times; open names must be unique"
                )
            )
    return out


def _name_key(elem: ET.Element | None) -> str:
    """A file name in a template: its text, or the placeholder element (``<OUTFILE_0/>``) it holds."""
    if elem is None:
        return ""
    if len(elem):
        return ET.tostring(elem[0]).decode().strip()
    return text_of(elem)
