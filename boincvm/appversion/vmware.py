"""App versions from a VMware VM directory: every file the VM needs becomes an app-version file.

The VM (its directory or its ``.vmx``) must be powered off and carry the snapshot
``boincvm-base``, from which every task makes a linked clone (see
:mod:`boincvm.hypervisor.vmware.files` for what is collected and refused). Each file gets

* a physical name ``APP_VERSION_<md5>_<name>`` (the name made safe for a URL: characters
  other than letters, digits, ``_ . -`` become ``_``), and
* a logical name ``vmware_<name>`` in the slot. BOINC clients since 7.0 would create
  directories for a ``/`` in a logical name, but a project with ``<use_symlinks/>`` then
  gets symbolic links whose ``../../projects/...`` target is wrong one level down; flat
  names avoid that.

``vm_job_defaults.xml`` names the ``.vmx`` as ``vm_image`` and lists every file as an
``<image_file>`` with the name it must have in the VM directory, which the wrapper rebuilds
in the slot. The files are copied as every app-version file is (:mod:`boincvm.appversion.staging`):
read once, runs of zeros skipped rather than written, so sparse files stay sparse.
"""

from __future__ import annotations

import functools
import posixpath
import re
from pathlib import Path

from boincvm.errors import BoincvmError, InputError
from boincvm.findings import Finding, error, info
from boincvm.hypervisor.base import BackendKind
from boincvm.hypervisor.vmware.files import BASE_SNAPSHOT, collect_vm, refuse_in_use
from boincvm.image.for_app_version import ImageParts, ImageSource, ShippedFile
from boincvm.job import DEFAULTS_OPEN_NAME, ImageFile, VmJob

LOGICAL_PREFIX = "vmware_"


def safe_name(name: str) -> str:
    """``name`` (a relative path) as one file name of letters, digits, ``_ . -``."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name.replace("/", "_")).lstrip(".") or "file"


def base_snapshot(options: dict[str, str]) -> str:
    """The snapshot tasks clone from: the ``base_snapshot`` backend option, else ``boincvm-base``."""
    return options.get("base_snapshot", BASE_SNAPSHOT)


def vmware_parts(source: ImageSource) -> ImageParts:
    """What the app version ships of a VMware VM: every file it needs, and the job defaults
    that name them.

    Raises:
        InputError: options that do not apply to a VMware VM, or a VM that cannot be shipped
            (see :func:`~boincvm.hypervisor.vmware.files.collect_vm`).
        PathEscapeError: a file reference is absolute or leaves the VM directory.
    """
    for option, value in (
        ("--initrd", source.initrd),
        ("--kernel-cmdline", source.kernel_cmdline),
        ("--disk", source.disk),
    ):
        if value is not None:
            raise InputError(f"{option} does not apply to a VMware VM", hint=f"drop {option}")
    vm = collect_vm(source.image, snapshot=base_snapshot(dict(source.backend_options)))
    files: list[ShippedFile] = []
    used: set[str] = set()
    for f in vm.files:
        safe = safe_name(f.name)
        stem, ext = posixpath.splitext(safe)
        n = 1
        while safe in used:  # "a b.vmdk" and "a_b.vmdk" in one VM
            n += 1
            safe = f"{stem}-{n}{ext}"
        used.add(safe)
        files.append(ShippedFile(f.path, LOGICAL_PREFIX + safe, safe, f"{f.name} ({f.role})", "VM file"))
    images = tuple(ImageFile(s.logical_name, f.name) for s, f in zip(files, vm.files, strict=True))
    return ImageParts(
        files=tuple(files),
        backend=BackendKind.VMWARE,
        job=VmJob(vm_image=images[0].open_name, memory_mb=vm.memory_mb, image_files=images),
        # Powered on while we copied? Then the copies may be torn: refuse rather than ship them.
        recheck=functools.partial(refuse_in_use, vm.root),
    )


def check_vmware_app_version(directory: Path, job: VmJob, logical: dict[str, str]) -> list[Finding]:
    """Findings for the VMware VM an app version ships (``logical``: logical -> physical name).

    The VM directory is laid out again (symbolic links in a temporary directory) and checked
    as ``package-image`` checks a VM: every file present, the base snapshot there.
    """
    import tempfile

    place = f"{DEFAULTS_OPEN_NAME}:vm_job"
    out: list[Finding] = []
    if job.backend != BackendKind.VMWARE:
        out.append(error(f"{place}.backend", "image_file entries are read by the vmware backend only"))
    if not job.image_files:
        return [
            error(
                f"{place}.image_file",
                "a VMware app version must list the VM's files (the wrapper rebuilds the VM from them)",
                hint="make it with: boincvm package-image VM_DIRECTORY --app NAME",
            )
        ]
    missing = [f.open_name for f in job.image_files if f.open_name not in logical]
    for name in missing:
        out.append(error(f"{place}.image_file", f"{name!r} is not a logical name of this app version"))
    vmx = next((f.file_name for f in job.image_files if f.open_name == job.vm_image), None)
    if missing or vmx is None or not vmx.lower().endswith(".vmx"):
        if vmx is not None and not vmx.lower().endswith(".vmx"):
            out.append(error(f"{place}.vm_image", f"{vmx} is not a .vmx file"))
        return out
    with tempfile.TemporaryDirectory(prefix="boincvm-check-") as tmp:
        root = Path(tmp)
        for f in job.image_files:
            target = root / f.file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to((directory / logical[f.open_name]).resolve())
        try:
            # The links are ours, to the app version's own files: follow them.
            vm = collect_vm(
                root / vmx,
                snapshot=base_snapshot(dict((o.name, o.value) for o in job.backend_options)),
                follow_links=True,
            )
        except BoincvmError as exc:
            return [*out, error(f"{place}.image_file", f"the shipped VM: {exc.message}", exc.hint)]
    shipped = {f.file_name for f in job.image_files}
    needed = {f.name for f in vm.files}
    for name in sorted(shipped - needed):
        out.append(info(f"{place}.image_file", f"{name} is shipped but the VM does not refer to it"))
    out.append(info(f"{place}.image_file", f"a VMware VM of {len(shipped)} files, snapshot {vm.snapshot!r}"))
    return out
