"""The vm job's model: the typed objects a job file becomes, their defaults, and the names
the slot gives the job files.

:class:`VmJob` is a job as written (``None``: not said here); :meth:`VmJob.merged` lays a
workunit's job over the app version's defaults; :class:`ResolvedJob` is the complete job
the wrapper runs (:func:`boincvm.job.validate.resolve` makes one).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace
from typing import Any

ROOT = "vm_job"
#: vboxwrapper's tag for the VM's memory (MiB), which the XML keeps; in Python the value is
#: ``memory_mb`` everywhere. Only the XML's edge names the tag: parsing, the places findings
#: name, and templates/vm_job.xml.j2.
MEMORY_TAG = "memory_size_mb"

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

    Each backend names and checks its own (``Backend.check_options``); docs/vm-job.md lists them.
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
    memory_mb: int | None = None
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
    memory_mb: int
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


def with_task(job: VmJob, **changes: Any) -> VmJob:
    """A copy of ``job`` whose task has ``changes`` applied."""
    return replace(job, task=replace(job.task or Task(), **changes))
