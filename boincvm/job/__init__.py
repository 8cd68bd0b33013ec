"""The vm job: what the wrapper installs, runs, copies in and out, and how the VM looks.

A vm job file (root ``<vm_job>``) exists at two levels: the app version ships job
*defaults* (the image, memory, guest directories) and each workunit ships a job with the
program to run. :meth:`VmJob.merged` lays the workunit job over the defaults and
:func:`resolve` turns the result into a :class:`ResolvedJob` with every value concrete.

The vocabulary borrows BOINC's ``job.xml`` (wrapper) and ``vbox_job.xml`` (vboxwrapper)
names wherever they mean the same thing; docs/vm-job.md documents every element.

The parts: :mod:`.model` (the typed objects, defaults and slot names), :mod:`.parse`
(XML -> :class:`VmJob`), :mod:`.validate` (findings, :func:`resolve`) and
:mod:`.render` (:class:`VmJob` -> XML). This package re-exports the first three; it does
not import :mod:`.render`, which needs jinja2, a library the wrapper ships without:
``from boincvm.job.render import render_job`` where a job is written.
"""

from __future__ import annotations

from boincvm.job.model import (
    CHECKPOINT_DISK_MARGIN_MB,
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_EXEC_DIR,
    DEFAULT_MEMORY_MB,
    DEFAULT_NCPUS,
    DEFAULTS_OPEN_NAME,
    JOB_OPEN_NAME,
    ROOT,
    BackendOption,
    CheckpointMode,
    CpuTimeSource,
    ImageFile,
    InputFile,
    OutputFile,
    Package,
    PackageKind,
    ResolvedJob,
    Task,
    VmJob,
    checkpoint_disk_mb,
    with_task,
)
from boincvm.job.parse import load_job, parse_job
from boincvm.job.validate import check_complete, resolve, validate_job

__all__ = [
    "CHECKPOINT_DISK_MARGIN_MB",
    "DEFAULTS_OPEN_NAME",
    "DEFAULT_BOOT_TIMEOUT",
    "DEFAULT_CHECKPOINT_INTERVAL",
    "DEFAULT_EXEC_DIR",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_NCPUS",
    "JOB_OPEN_NAME",
    "ROOT",
    "BackendOption",
    "CheckpointMode",
    "CpuTimeSource",
    "ImageFile",
    "InputFile",
    "OutputFile",
    "Package",
    "PackageKind",
    "ResolvedJob",
    "Task",
    "VmJob",
    "check_complete",
    "checkpoint_disk_mb",
    "load_job",
    "parse_job",
    "resolve",
    "validate_job",
    "with_task",
]
