"""``init_data.xml`` (BOINC's ``APP_INIT_DATA``): read by the app, written by the client.

The client writes this file into the slot directory before every start of the app
(``write_init_data_file`` in ``lib/app_ipc.cpp``). :func:`render_init_data` writes the same
tags in the same order and number formats as the 7.20.5 client (one tag per line,
doubles with ``%f``), with one deliberate difference: text is XML-escaped everywhere,
where the client leaves paths and names raw (a path with ``&`` would otherwise make
the file unreadable for every strict parser).

:func:`parse_init_data` reads it through defusedxml (no DTDs, no entities). Tags it does
not know are ignored, as BOINC does; a known tag with an unreadable value is an error
that names the tag.
"""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from boincvm.boinc.files import INIT_DATA_FILE, MMAP_FILE
from boincvm.bounds import number_problem
from boincvm.errors import XmlError
from boincvm.xmlio import escape_text, is_flag_true, parse_xml, read_bytes, text_of

#: The API's checkpoint period when the client gives 0 (``DEFAULT_CHECKPOINT_PERIOD``).
DEFAULT_CHECKPOINT_PERIOD = 300.0
#: ``shm_key`` value that selects the memory-mapped file (any other: System V shm).
SHM_KEY_MMAP = -1


@dataclass(frozen=True)
class HostInfo:
    """The host description inside ``<host_info>`` (``HOST_INFO::write`` order)."""

    timezone: int = 0
    domain_name: str = ""
    ip_addr: str = ""
    host_cpid: str = ""
    p_ncpus: int = 0
    p_vendor: str = ""
    p_model: str = ""
    p_features: str = ""
    p_fpops: float = 0.0
    p_iops: float = 0.0
    p_membw: float = 0.0
    p_calculated: float = 0.0
    p_vm_extensions_disabled: bool = False
    m_nbytes: float = 0.0
    m_cache: float = 0.0
    m_swap: float = 0.0
    d_total: float = 0.0
    d_free: float = 0.0
    os_name: str = ""
    os_version: str = ""
    n_usable_coprocs: int = 0
    wsl_available: bool = False
    product_name: str = ""
    mac_address: str = ""
    virtualbox_version: str = ""


@dataclass(frozen=True)
class ProxyInfo:
    """The client's proxy settings (``<proxy_info>``); a wrapper may pass them to a guest."""

    use_http_proxy: bool = False
    use_socks_proxy: bool = False
    use_http_auth: bool = False
    socks_server_name: str = ""
    socks_server_port: int = 80
    http_server_name: str = ""
    http_server_port: int = 80
    socks5_user_name: str = ""
    socks5_user_passwd: str = ""
    socks5_remote_dns: bool = False
    http_user_name: str = ""
    http_user_passwd: str = ""
    no_proxy: str = ""
    no_autodetect: bool = False


@dataclass(frozen=True)
class InitData:
    """Everything ``init_data.xml`` says, typed. Defaults are BOINC's when a tag is absent.

    The fields a wrapper uses most: ``project_dir`` (absolute), ``slot``, ``wu_name``,
    ``result_name``, ``wu_cpu_time`` (CPU seconds of earlier runs, to add to reports),
    ``checkpoint_period``, ``fraction_done_start``/``end``, ``ncpus``, the ``rsc_*``
    bounds, ``client_pid`` and ``app_files`` (physical names of the app version's files).
    """

    major_version: int = 0
    minor_version: int = 0
    release: int = 0
    app_version: int = 0
    userid: int = 0
    teamid: int = 0
    hostid: int = 0
    app_name: str = ""
    plan_class: str = ""
    symstore: str = ""
    acct_mgr_url: str = ""
    project_preferences: str | None = None
    team_name: str = ""
    user_name: str = ""
    project_dir: str = ""
    boinc_dir: str = ""
    authenticator: str = ""
    wu_name: str = ""
    result_name: str = ""
    shm_key: int = 0
    slot: int = 0
    client_pid: int = 0
    wu_cpu_time: float = 0.0
    starting_elapsed_time: float = 0.0
    using_sandbox: bool = False
    vm_extensions_disabled: bool = False
    user_total_credit: float = 0.0
    user_expavg_credit: float = 0.0
    host_total_credit: float = 0.0
    host_expavg_credit: float = 0.0
    resource_share_fraction: float = 0.0
    checkpoint_period: float = 0.0
    fraction_done_start: float = 0.0
    fraction_done_end: float = 1.0
    gpu_type: str = ""
    gpu_device_num: int = -1
    gpu_opencl_dev_index: int = -1
    gpu_usage: float = 0.0
    ncpus: float = 0.0
    rsc_fpops_est: float = 0.0
    rsc_fpops_bound: float = 0.0
    rsc_memory_bound: float = 0.0
    rsc_disk_bound: float = 0.0
    computation_deadline: float = 0.0
    vbox_window: bool = False
    no_priority_change: bool = False
    process_priority: int = -1
    process_priority_special: int = -1
    host_info: HostInfo = field(default_factory=HostInfo)
    proxy_info: ProxyInfo = field(default_factory=ProxyInfo)
    global_preferences: str | None = None
    app_files: tuple[str, ...] = ()

    @property
    def uses_mmap(self) -> bool:
        """The client created ``boinc_mmap_file`` (``shm_key`` is -1)."""
        return self.shm_key == SHM_KEY_MMAP

    @property
    def effective_checkpoint_period(self) -> float:
        """Seconds between checkpoints as the API paces them (300 when the client says 0)."""
        return self.checkpoint_period if self.checkpoint_period > 0 else DEFAULT_CHECKPOINT_PERIOD

    def fraction_for_client(self, fraction: float) -> float:
        """Map the app's own 0..1 progress into ``fraction_done_start..end``."""
        return self.fraction_done_start + fraction * (self.fraction_done_end - self.fraction_done_start)


# --------------------------------------------------------------------------------------
# Parsing

_Kind = Callable[[str, str], Any]


def _as_int(text: str, place: str) -> int:
    if text == "":
        return 0  # BOINC reads <foo></foo> as 0
    try:
        return int(text, 0) if text.lower().startswith(("0x", "-0x")) else int(text)
    except ValueError:
        raise XmlError(f"{place} must be an integer, not {text!r}") from None


def _as_float(text: str, place: str) -> float:
    if text == "":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise XmlError(f"{place} must be a number, not {text!r}") from None
    # The client writes doubles with %f, which never gives nan or inf; such a value would
    # pass every range check the wrapper makes (each comparison with NaN is false).
    if problem := number_problem(value):
        raise XmlError(
            f"{place} {text[:40]!r} {problem}",
            hint="the client writes init_data.xml before each start; let it rewrite this slot's file",
        )
    return value


def _as_bool(text: str, place: str) -> bool:
    probe = ET.Element("x")
    probe.text = text
    value = is_flag_true(probe)
    if value is None:
        raise XmlError(f"{place} must be 0 or 1, not {text!r}")
    return value


def _as_str(text: str, place: str) -> str:  # noqa: ARG001 -- same signature as the others
    return text


_CONVERT: dict[type, _Kind] = {int: _as_int, float: _as_float, bool: _as_bool, str: _as_str}
_TYPE_NAMES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}


def _scalar_fields(cls: type) -> dict[str, type]:
    out: dict[str, type] = {}
    for f in fields(cls):
        typ = _TYPE_NAMES.get(str(f.type))
        if typ is not None:
            out[f.name] = typ
    return out


_INIT_SCALARS = _scalar_fields(InitData)
_HOST_SCALARS = _scalar_fields(HostInfo)
_PROXY_SCALARS = _scalar_fields(ProxyInfo)


def _raw_xml(elem: ET.Element) -> str:
    """An element serialized on its own (its tail whitespace dropped)."""
    alone = copy.deepcopy(elem)
    alone.tail = None
    return ET.tostring(alone, encoding="unicode")


def _parse_block(elem: ET.Element, scalars: dict[str, type], where: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for child in elem:
        typ = scalars.get(child.tag)
        if typ is None:
            continue
        values[child.tag] = _CONVERT[typ](text_of(child), f"{where}: <{child.tag}>")
    return values


def parse_init_data(data: bytes | str, *, what: str = INIT_DATA_FILE) -> InitData:
    """Parse the text of an ``init_data.xml``.

    Args:
        data: the document.
        what: how to name it in errors.

    Raises:
        XmlError: malformed XML, a DTD or entities, a root other than ``<app_init_data>``,
            or a known tag whose value is not of its type.
    """
    root = parse_xml(data, what=what)
    if root.tag != "app_init_data":
        raise XmlError(f"{what} has root <{root.tag}>; an init_data.xml has <app_init_data>")
    values = _parse_block(root, _INIT_SCALARS, what)
    app_files: list[str] = []
    for child in root:
        if child.tag == "host_info":
            values["host_info"] = HostInfo(**_parse_block(child, _HOST_SCALARS, f"{what}: <host_info>"))
        elif child.tag == "proxy_info":
            proxy = _parse_block(child, _PROXY_SCALARS, f"{what}: <proxy_info>")
            values["proxy_info"] = ProxyInfo(**proxy)
        elif child.tag in ("project_preferences", "global_preferences"):
            values[child.tag] = _raw_xml(child)
        elif child.tag == "app_file":
            app_files.append(text_of(child))
    values["app_files"] = tuple(app_files)
    return InitData(**values)


def read_init_data(path: Path) -> InitData:
    """Read and parse an ``init_data.xml`` file.

    Raises:
        InputError: the file is missing or unreadable.
        XmlError: see :func:`parse_init_data`.
    """
    return parse_init_data(read_bytes(path, what="init data file"), what=str(path.name))


# --------------------------------------------------------------------------------------
# Writing (what the 7.20.5 client writes)

# Scalars after <shm_key>, in the client's order.
_MIDDLE = (
    "slot", "client_pid", "wu_cpu_time", "starting_elapsed_time", "using_sandbox",
    "vm_extensions_disabled", "user_total_credit", "user_expavg_credit", "host_total_credit",
    "host_expavg_credit", "resource_share_fraction", "checkpoint_period", "fraction_done_start",
    "fraction_done_end", "gpu_type", "gpu_device_num", "gpu_opencl_dev_index", "gpu_usage", "ncpus",
    "rsc_fpops_est", "rsc_fpops_bound", "rsc_memory_bound", "rsc_disk_bound", "computation_deadline",
    "vbox_window", "no_priority_change", "process_priority", "process_priority_special",
)  # fmt: skip
_HOST_ORDER = (
    "host_cpid", "p_ncpus", "p_vendor", "p_model", "p_features", "p_fpops", "p_iops", "p_membw",
    "p_calculated", "p_vm_extensions_disabled", "m_nbytes", "m_cache", "m_swap", "d_total", "d_free",
    "os_name", "os_version", "n_usable_coprocs", "wsl_available",
)  # fmt: skip
_PROXY_ORDER = (
    "socks_server_name", "socks_server_port", "http_server_name", "http_server_port", "socks5_user_name",
    "socks5_user_passwd", "socks5_remote_dns", "http_user_name", "http_user_passwd", "no_proxy",
    "no_autodetect",
)  # fmt: skip


def _value(value: object, typ: type | None = None) -> str:
    if typ is bool or isinstance(value, bool):
        return "1" if value else "0"
    if typ is float or isinstance(value, float):
        return f"{float(value):f}"  # type: ignore[arg-type]
    if typ is int:
        return str(int(value))  # type: ignore[call-overload]
    return escape_text(value)


def _line(tag: str, value: object, indent: str = "", typ: type | None = None) -> str:
    return f"{indent}<{tag}>{_value(value, typ)}</{tag}>\n"


def render_host_info(host: HostInfo) -> str:
    """The ``<host_info>`` block as ``HOST_INFO::write(mf, true, true)`` writes it."""
    out = ["<host_info>\n", _line("timezone", host.timezone, "    ", int)]
    out += [_line("domain_name", host.domain_name, "    "), _line("ip_addr", host.ip_addr, "    ")]
    out += [_line(name, getattr(host, name), "    ", _HOST_SCALARS[name]) for name in _HOST_ORDER]
    for name in ("product_name", "mac_address", "virtualbox_version"):
        if getattr(host, name):
            out.append(_line(name, getattr(host, name), "    "))
    out.append("    <coprocs>\n    </coprocs>\n</host_info>\n")
    return "".join(out)


def render_proxy_info(proxy: ProxyInfo) -> str:
    """The ``<proxy_info>`` block as ``PROXY_INFO::write`` writes it."""
    out = ["<proxy_info>\n"]
    for flag in ("use_http_proxy", "use_socks_proxy", "use_http_auth"):
        if getattr(proxy, flag):
            out.append(f"    <{flag}/>\n")
    out += [_line(name, getattr(proxy, name), "    ", _PROXY_SCALARS[name]) for name in _PROXY_ORDER]
    out.append("</proxy_info>\n")
    return "".join(out)


def default_global_preferences(*, disk_interval: float = 60.0, leave_apps_in_memory: bool = False) -> str:
    """A ``<global_preferences>`` block with BOINC's defaults for the prefs apps look at."""
    prefs: tuple[tuple[str, object], ...] = (
        ("source_project", ""),
        ("mod_time", 0.0),
        ("run_on_batteries", True),
        ("run_if_user_active", True),
        ("run_gpu_if_user_active", False),
        ("suspend_cpu_usage", 25.0),
        ("leave_apps_in_memory", leave_apps_in_memory),
        ("max_ncpus_pct", 100.0),
        ("cpu_scheduling_period_minutes", 60.0),
        ("disk_interval", float(disk_interval)),
        ("disk_max_used_gb", 100.0),
        ("disk_max_used_pct", 90.0),
        ("disk_min_free_gb", 0.1),
        ("vm_max_used_pct", 75.0),
        ("ram_max_used_busy_pct", 50.0),
        ("ram_max_used_idle_pct", 90.0),
        ("cpu_usage_limit", 100.0),
    )
    body = "".join(_line(tag, value, "   ") for tag, value in prefs)
    return f"<global_preferences>\n{body}</global_preferences>"


def render_init_data(data: InitData) -> str:
    """The text of ``init_data.xml`` for ``data``, as the 7.20.5 client writes it.

    Strings are written only when non-empty (as the client does); ``plan_class``, which
    7.20.5 never writes, only when set. A missing ``global_preferences`` is written as
    :func:`default_global_preferences` with ``disk_interval`` = ``checkpoint_period``.
    """
    out = ["<app_init_data>\n"]
    for name in ("major_version", "minor_version", "release", "app_version", "userid", "teamid", "hostid"):
        out.append(_line(name, getattr(data, name), "", int))
    for name in ("app_name", "plan_class", "symstore", "acct_mgr_url"):
        if getattr(data, name):
            out.append(_line(name, getattr(data, name)))
    if data.project_preferences:
        out.append(data.project_preferences + "\n")
    for name in (
        "team_name",
        "user_name",
        "project_dir",
        "boinc_dir",
        "authenticator",
        "wu_name",
        "result_name",
    ):
        if getattr(data, name):
            out.append(_line(name, getattr(data, name)))
    out.append(_line("shm_key", data.shm_key, "", int))
    out += [_line(name, getattr(data, name), "", _INIT_SCALARS[name]) for name in _MIDDLE]
    out.append(render_host_info(data.host_info))
    out.append(render_proxy_info(data.proxy_info))
    prefs = data.global_preferences or default_global_preferences(disk_interval=data.checkpoint_period)
    out.append(prefs + "\n")
    out += [_line("app_file", name) for name in data.app_files]
    out.append("</app_init_data>\n")
    return "".join(out)


def write_init_data(path: Path, data: InitData) -> None:
    """Write ``init_data.xml`` (replacing any earlier one, as the client does before each start).

    Raises:
        OSError: the file cannot be written.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_init_data(data), encoding="utf-8")
    tmp.replace(path)


#: How the Windows client names its host's OS in ``init_data.xml``.
WINDOWS_OS_NAME = "Microsoft Windows"


def behind_wsl_wrapper(data: InitData, slot_dir: Path) -> bool:
    """Whether BOINC's ``wsl_wrapper`` started this process inside WSL: the client describes
    a Windows host and left no ``boinc_mmap_file`` (its shared memory is a Windows object).

    There the app has no channel to the client: it is never told to suspend, quit or abort
    (wsl_wrapper stops, continues and kills the whole process group itself), its status
    goes nowhere, and it times its checkpoints by ``checkpoint_period`` alone.
    """
    return data.host_info.os_name.startswith(WINDOWS_OS_NAME) and not (slot_dir / MMAP_FILE).exists()
