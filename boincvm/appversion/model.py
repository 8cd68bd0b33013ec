"""The app version as boincvm models it: the request package-image takes, the files it made, and
the ``version.xml`` it writes (read back here as :class:`VersionXml`)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from boincvm.errors import InputError
from boincvm.findings import Finding, error
from boincvm.job import DEFAULTS_OPEN_NAME, VmJob, load_job
from boincvm.names import logical_name_problem
from boincvm.xmlio import parse_xml, read_bytes, text_of

#: What package-image made, read by validate and run-local. A dot-name: BOINC's update_versions
#: skips those, so the summary is never registered as an app-version file (each app version has
#: one of that name; registered, a second app version would clash with the first's).
SUMMARY_NAME = ".boincvm-app-version.json"
#: The summary's name before it became a dot-name, still read from older app versions.
LEGACY_SUMMARY_NAME = "boincvm-app-version.json"
#: BOINC API version declared so the client uses the memory-mapped channel (>= 7).
API_VERSION = "7.20.0"
#: Use <gzip/> only when it saves at least this fraction of the download.
GZIP_MIN_SAVING = 0.10

Progress = Callable[[str, int, int | None], None]


class RuntimeKind(StrEnum):
    """Where the QEMU backend's QEMU comes from on the volunteer's host."""

    #: The app version ships the admin's QEMU as one archive (:mod:`boincvm.appversion.runtime`).
    BUNDLED = "bundled"
    #: The host's PATH has qemu-system-x86_64 and qemu-img.
    SYSTEM = "system"


#: The runtime archive's logical name in the slot (and the QEMU backend option's value).
RUNTIME_OPEN_NAME = "qemu_runtime.tar.xz"
#: The logical name of the wrapper's runtime (:mod:`boincvm.appversion.wrapper_runtime`).
WRAPPER_RUNTIME_OPEN_NAME = "wrapper_runtime.tar.xz"
#: The tail of the static frozen wrapper's physical name, beside the launcher.
STATIC_WRAPPER_TAIL = "boincvm-wrapper-static"


class WrapperKind(StrEnum):
    """The form of the app version's main program."""

    #: An ELF executable that needs no Python on the host (:mod:`boincvm.appversion.frozen`).
    FROZEN = "frozen"
    #: A Python zip application (:mod:`boincvm.appversion.zipapp`): needs Python 3.11+ on the host's PATH.
    PYZ = "pyz"


#: The main program's physical name ends with these (no logical name: the client runs it by path).
WRAPPER_FILE_NAMES = {WrapperKind.FROZEN: "boincvm-wrapper", WrapperKind.PYZ: "wrapper.pyz"}
#: The platform the frozen wrapper is built for (the machine package-image runs on).
FROZEN_PLATFORM = "x86_64-pc-linux-gnu"


@dataclass(frozen=True)
class AppVersionFile:
    """One file of an app version (``copy_file``: the slot gets a copy, not a link file)."""

    physical_name: str
    logical_name: str | None
    md5: str
    nbytes: int
    main_program: bool = False
    gzip: bool = False
    copy_file: bool = False


@dataclass(frozen=True)
class AppVersionRequest:
    """What ``package-image`` was asked to make.

    Attributes:
        image: a disk image (qcow2, raw, vmdk) or a directory with ``boincvm-image.json``.
        app_name: BOINC application name.
        version: app version ("1.00" -> version_num 100).
        output_dir: the platform directory to create.
        platform: BOINC platform name.
        plan_class: optional plan class.
        memory_mb: guest memory (default: what the image suggests).
        exec_dir: guest working directory (default: what the image suggests).
        compress: compress qcow2 clusters.
        gzip_downloads: mark files that compress well with <gzip/>.
        force: replace an existing output directory.
        initrd: with a kernel as ``image``: its initramfs.
        kernel_cmdline: with a kernel as ``image``: its command line.
        disk: with a kernel as ``image``: a disk to attach (converted like any disk image).
        sign_key: a BOINC code-signing private key: every file gets a ``FILE.sig``.
        backend_options: (name, value) settings for the backend, checked here, written into
            the job defaults (e.g. QEMU's machine, VMware's guest_user).
        wrapper: the main program's form: frozen (no Python on the host) or a zip application.
        ncpus: the VM's CPUs (the job defaults' ``ncpus``; the plan class's ``min_ncpus``).
        require_kvm: the job defaults say ``<vm_accel_required/>``: the wrapper never falls
            back to TCG, and the plan class asks for ``kvm_cpu_feature``.
        kvm_cpu_feature: ``vmx`` (Intel) or ``svm`` (AMD), the flag the plan class requires
            with ``require_kvm`` (BOINC's feature list is an AND: one vendor per plan class).
        runtime: QEMU bundled or the host's; None: bundled for QEMU app versions (VMware
            app versions have none).
        wsl_wrapper: BOINC's ``wsl_wrapper.exe``: make a Windows app version that runs the
            frozen wrapper inside WSL (:mod:`boincvm.appversion.wsl`); None: a Linux one.
    """

    image: Path
    app_name: str
    version: str
    output_dir: Path
    platform: str = "x86_64-pc-linux-gnu"
    plan_class: str | None = None
    memory_mb: int | None = None
    exec_dir: str | None = None
    compress: bool = True
    gzip_downloads: bool = True
    force: bool = False
    initrd: Path | None = None
    kernel_cmdline: str | None = None
    disk: Path | None = None
    sign_key: Path | None = None
    backend_options: tuple[tuple[str, str], ...] = ()
    wrapper: WrapperKind = WrapperKind.FROZEN
    ncpus: int | None = None
    require_kvm: bool = False
    kvm_cpu_feature: str = "vmx"
    runtime: RuntimeKind | None = None
    wsl_wrapper: Path | None = None


@dataclass(frozen=True)
class AppVersion:
    """The result of ``package_image`` (``wsl``: a Windows app version that runs through WSL)."""

    directory: Path
    app_name: str
    version: str
    version_num: int
    platform: str
    files: tuple[AppVersionFile, ...] = field(default_factory=tuple)
    plan_class: str | None = None
    wsl: bool = False

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "directory": str(self.directory),
            "app_name": self.app_name,
            "version": self.version,
            "version_num": self.version_num,
            "platform": self.platform,
            "plan_class": self.plan_class,
            "wsl": self.wsl,
            "files": [f.__dict__ for f in self.files],
        }


def version_num(version: str) -> int:
    """BOINC's ``parse_version``: "X.Y" -> 100*X + Y; "7" -> 7.

    Raises:
        InputError: not of that form.
    """
    m = re.fullmatch(r"(\d+)(?:\.(\d{1,2}))?", version)
    if not m:
        raise InputError(f"version {version!r} is not of the form X.YY", hint="use e.g. 1.00 or 1.5")
    major, minor = int(m.group(1)), int(m.group(2) or 0)
    return 100 * major + minor if m.group(2) is not None else major


@dataclass(frozen=True)
class VersionXml:
    """What a ``version.xml`` says."""

    files: tuple[AppVersionFile, ...]
    api_version: str | None
    is_wrapper: bool


def parse_version_xml(data: bytes, what: str = "version.xml") -> tuple[VersionXml, list[Finding]]:
    """Parse a version.xml into its files and flags, with findings.

    Raises:
        XmlError: not well-formed or unsafe.
    """
    root = parse_xml(data, what=what)
    out: list[Finding] = []
    if root.tag != "version":
        out.append(error("version", f"root element is <{root.tag}>, expected <version>"))
    files: list[AppVersionFile] = []
    for i, f in enumerate(root.findall("file")):
        phys = f.find("physical_name")
        if phys is None or not text_of(phys):
            out.append(error(f"version.file[{i}].physical_name", "is missing"))
            continue
        logical = f.find("logical_name")
        # Both names are joined to the app version and the slot directories: one component each.
        bad = [
            (tag, problem)
            for tag, elem in (("physical_name", phys), ("logical_name", logical))
            if elem is not None and (problem := logical_name_problem(text_of(elem)))
        ]
        if bad:
            out += [
                error(f"version.file[{i}].{tag}", problem, hint="give a plain file name: no '/', no '..'")
                for tag, problem in bad
            ]
            continue
        files.append(
            AppVersionFile(
                physical_name=text_of(phys),
                logical_name=text_of(logical) if logical is not None else None,
                md5="",
                nbytes=0,
                main_program=f.find("main_program") is not None,
                gzip=f.find("gzip") is not None,
                copy_file=f.find("copy_file") is not None,
            )
        )
    api = root.find("api_version")
    return VersionXml(
        tuple(files), text_of(api) if api is not None else None, root.find("is_wrapper") is not None
    ), out


def summary_path(directory: Path) -> Path:
    """package-image's summary in an app version directory: the dot-name, or the name older
    versions gave it (which may not exist either)."""
    summary = directory / SUMMARY_NAME
    return summary if summary.exists() else directory / LEGACY_SUMMARY_NAME


def read_summary(directory: Path) -> dict[str, object] | None:
    """What package-image recorded of an app version (:meth:`AppVersion.as_dict`); None when
    there is no summary or it is not a JSON object."""
    try:
        recorded = json.loads(summary_path(directory).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def app_version_app_name(directory: Path) -> str | None:
    """The app an app version directory is for, as package-image recorded it (None: unknown)."""
    value = (read_summary(directory) or {}).get("app_name")
    return value if isinstance(value, str) else None


def check_app_matches(directory: Path, app_name: str) -> None:
    """Refuse workunits of ``app_name`` for the app version in ``directory`` if it is another app's.

    Raises:
        InputError: the app version was made for another app (a real project would never
            send these workunits to it).
    """
    theirs = app_version_app_name(directory)
    if theirs is not None and theirs != app_name:
        raise InputError(
            f"the workunits are for app {app_name!r}, but the app version {directory} is for {theirs!r}",
            hint=f"use --app {theirs}, or give the app version of {app_name}",
        )


def app_version_defaults(directory: Path) -> VmJob:
    """The job defaults (``vm_job_defaults.xml``) of an app version directory.

    Raises:
        InputError: no version.xml, or it names no such file.
        XmlError: the defaults are not a valid vm job.
    """
    vx, _ = parse_version_xml(read_bytes(directory / "version.xml", what="version.xml"))
    for f in vx.files:
        if f.logical_name == DEFAULTS_OPEN_NAME:
            return load_job(directory / f.physical_name)
    raise InputError(
        f"{directory} has no {DEFAULTS_OPEN_NAME}",
        hint="give the directory package-image made (--app-version)",
    )
