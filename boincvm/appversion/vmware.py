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
in the slot. Files are read once: copied with their md5 and the gzip estimate computed on
the way, and runs of zeros are skipped rather than written, so sparse files stay sparse.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from boincvm.appversion.model import (
    GZIP_MIN_SAVING,
    AppVersionFile,
    AppVersionRequest,
)
from boincvm.errors import BoincvmError, InputError
from boincvm.findings import Finding, error, info
from boincvm.hypervisor.vmware.files import BASE_SNAPSHOT, collect_vm, refuse_in_use
from boincvm.image.descriptor import DESCRIPTOR_NAME
from boincvm.job import DEFAULTS_OPEN_NAME, ImageFile, VmJob
from boincvm.paths import open_regular

if TYPE_CHECKING:
    from boincvm.appversion.model import AppVersionFile, AppVersionRequest

LOGICAL_PREFIX = "vmware_"
_BLOCK = 1 << 20
_ZEROS = bytes(_BLOCK)


def is_vmware_vm(path: Path) -> bool:
    """True for a ``.vmx`` file or a directory holding one (and no ``boincvm-image.json``)."""
    if path.is_dir():
        has_vmx = any(p.suffix.lower() == ".vmx" for p in path.iterdir())
        return has_vmx and not (path / DESCRIPTOR_NAME).exists()
    return path.suffix.lower() == ".vmx"


def safe_name(name: str) -> str:
    """``name`` (a relative path) as one file name of letters, digits, ``_ . -``."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name.replace("/", "_")).lstrip(".") or "file"


def copy_hashed(src: Path, dst: Path, *, estimate_gzip: bool) -> tuple[str, int, int | None]:
    """Copy ``src`` to ``dst`` in one pass: md5, size and (optionally) the gzip -6 size.

    Blocks of zeros are skipped with a seek, so holes stay holes (a preallocated flat
    extent is mostly zeros).
    """
    md5 = hashlib.md5(usedforsecurity=False)
    comp = zlib.compressobj(6, zlib.DEFLATED, 31) if estimate_gzip else None
    size = packed = 0
    with open_regular(src, f"VM file {src}") as fi, dst.open("wb") as fo:
        while block := fi.read(_BLOCK):
            md5.update(block)
            size += len(block)
            if comp is not None:
                packed += len(comp.compress(block))
            if block == _ZEROS[: len(block)]:
                fo.seek(len(block), 1)
            else:
                fo.write(block)
        fo.truncate(size)
    if comp is not None:
        packed += len(comp.flush())
    return md5.hexdigest(), size, packed if comp is not None else None


def base_snapshot(options: dict[str, str]) -> str:
    """The snapshot tasks clone from: the ``base_snapshot`` backend option, else ``boincvm-base``."""
    return options.get("base_snapshot", BASE_SNAPSHOT)


def package_vmware(
    req: AppVersionRequest, tmp: Path, prefix: str, note: Callable[[str], None]
) -> tuple[list[AppVersionFile], VmJob]:
    """Add the VM's files to the app version being built in ``tmp``; return them and the job defaults.

    Raises:
        InputError: options that do not apply to a VMware VM, or a VM that cannot be shipped
            (see :func:`~boincvm.hypervisor.vmware.files.collect_vm`).
        PathEscapeError: a file reference is absolute or leaves the VM directory.
    """
    for option, value in (
        ("--initrd", req.initrd),
        ("--kernel-cmdline", req.kernel_cmdline),
        ("--disk", req.disk),
    ):
        if value is not None:
            raise InputError(f"{option} does not apply to a VMware VM", hint=f"drop {option}")
    vm = collect_vm(req.image, snapshot=base_snapshot(dict(req.backend_options)))
    files: list[AppVersionFile] = []
    images: list[ImageFile] = []
    used: set[str] = set()
    for f in vm.files:
        safe = safe_name(f.name)
        stem, ext = posixpath.splitext(safe)
        n = 1
        while safe in used:  # "a b.vmdk" and "a_b.vmdk" in one VM
            n += 1
            safe = f"{stem}-{n}{ext}"
        used.add(safe)
        logical = LOGICAL_PREFIX + safe
        note(f"adding {f.name} ({f.role})")
        staging = tmp / f".{safe}.part"
        md5, size, packed = copy_hashed(f.path, staging, estimate_gzip=req.gzip_downloads)
        physical = f"{prefix}_{md5[:12]}_{safe}"
        staging.rename(tmp / physical)
        gz = packed is not None and size > 4096 and packed < size * (1 - GZIP_MIN_SAVING)
        files.append(AppVersionFile(physical, logical, md5, size, gzip=gz))
        images.append(ImageFile(logical, f.name))
    # Powered on while we copied? Then the copies may be torn: refuse rather than ship them.
    refuse_in_use(vm.root)
    job = VmJob(
        backend="vmware",
        vm_image=images[0].open_name,
        memory_size_mb=req.memory_mb or vm.memsize_mb,
        image_files=tuple(images),
    )
    return files, job


def check_vmware_app_version(directory: Path, job: VmJob, logical: dict[str, str]) -> list[Finding]:
    """Findings for the VMware VM an app version ships (``logical``: logical -> physical name).

    The VM directory is laid out again (symbolic links in a temporary directory) and checked
    as ``package-image`` checks a VM: every file present, the base snapshot there.
    """
    import tempfile

    place = f"{DEFAULTS_OPEN_NAME}:vm_job"
    out: list[Finding] = []
    if job.backend != "vmware":
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
