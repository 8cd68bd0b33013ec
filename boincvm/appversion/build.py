"""App versions: a base image -> a BOINC app version directory ready for ``update_versions``.

The image is a disk (qcow2, raw, vmdk), a kernel (+ initramfs), a ``build-image``
directory, or a VMware VM directory (see :mod:`boincvm.appversion.vmware`).

The directory made by :func:`package_image` is the platform directory of an app version
(``apps/APP/VERSION/PLATFORM[__PLAN_CLASS]/`` in a project)::

    APP_VERSION_<md5>_boincvm-wrapper  main program: the wrapper, an ELF executable (frozen), or
                                       APP_VERSION_<md5>_wrapper.pyz, a Python zip application
    APP_VERSION_vm_job_defaults.xml    logical name vm_job_defaults.xml: image, memory, guest dirs
    APP_VERSION_<md5>_vmlinux ...      the image files, logical names vm_kernel, vm_initrd, vm_disk.qcow2
    version.xml                        files, logical names, <is_wrapper/>, <dont_throttle/>, api_version
    .boincvm-app-version.json          what boincvm made (read by validate and run-local; a dot-name,
                                       which update_versions skips, so volunteers never download it)

Physical names carry the version and content hash, so they are globally unique and
immutable as BOINC requires. Images are never inflated: ``qemu-img convert`` keeps holes
and compresses qcow2 clusters; files that compress well get BOINC's ``<gzip/>`` download
compression.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from boincvm import proc

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa
from boincvm.appversion.frozen import build_frozen_wrapper
from boincvm.appversion.model import (
    API_VERSION,
    DISK_OPEN_NAME,
    FROZEN_PLATFORM,
    GZIP_MIN_SAVING,
    INITRD_OPEN_NAME,
    KERNEL_OPEN_NAME,
    RUNTIME_OPEN_NAME,
    SUMMARY_NAME,
    WRAPPER_FILE_NAMES,
    AppVersion,
    AppVersionFile,
    AppVersionRequest,
    Progress,
    RuntimeKind,
    WrapperKind,
    version_num,
)
from boincvm.appversion.plan_class import ENTRY_NAME as PLAN_CLASS_ENTRY
from boincvm.appversion.plan_class import KVM_CPU_FEATURES, PlanClassSpec
from boincvm.appversion.runtime import cached_runtime_archive
from boincvm.appversion.vmware import base_snapshot, is_vmware_vm, package_vmware
from boincvm.appversion.zipapp import build_wrapper_zipapp
from boincvm.atomicdir import building
from boincvm.errors import InputError
from boincvm.hashing import md5_file
from boincvm.hypervisor.base import backend_class
from boincvm.hypervisor.vmware.files import collect_vm
from boincvm.image.container import image_task
from boincvm.image.descriptor import DESCRIPTOR_NAME, ImageDescriptor, ImageFormat
from boincvm.image.elf import looks_like_kernel
from boincvm.image.refs import declared_format, inspect_disk, inspect_image_dir
from boincvm.job import (
    DEFAULTS_OPEN_NAME,
    BackendOption,
    Task,
    VmJob,
)
from boincvm.job.render import render_job
from boincvm.names import check_identifier
from boincvm.paths import check_regular, open_regular, refuse_output_overlapping
from boincvm.render import render
from boincvm.signing import load_private_key, sign_file


def _md5(path: Path) -> tuple[str, int]:
    return md5_file(path)


def _gzip_helps(path: Path) -> bool:
    """Stream the file through zlib and say whether it shrinks by GZIP_MIN_SAVING."""
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    size = out = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            size += len(block)
            out += len(comp.compress(block))
    out += len(comp.flush())
    return size > 4096 and out < size * (1 - GZIP_MIN_SAVING)


def _convert_disk(src: Path, dst: Path, *, compress: bool) -> None:
    """Convert a disk to a (compressed) qcow2, once its whole reference chain has been checked.

    Raises:
        PathEscapeError: the disk refers to a file outside its directory, or through a symbolic link.
        InputError: not a readable image of its declared format, too small, or with a backing file.
    """
    disk = inspect_disk(src, what=src.name, declared=declared_format(src))
    if disk.backing is not None:
        raise InputError(
            f"{src.name} has a backing file ({disk.backing.name})",
            hint="flatten it first: qemu-img convert -O qcow2 IMAGE flat.qcow2",
        )
    fmt = disk.format
    size = src.stat().st_size
    if fmt == "raw" and size < 1024 * 1024:
        raise InputError(
            f"{src.name} is {size} bytes: too small to be a disk image",
            hint="give a disk image (qcow2, raw, vmdk) of at least 1 MiB",
        )
    # -m/-W: parallel, out-of-order cluster writes; compression then uses both cores. The
    # format is the one checked (-f), never probed again, and the path absolute, so no
    # "proto:" prefix of a file name can make qemu-img read anything else.
    cmd: list[str | os.PathLike[str]] = ["qemu-img", "convert", "-m", "8", "-W", "-f", fmt, "-O", "qcow2"]
    if compress:
        cmd.append("-c")
    proc.run([*cmd, src.resolve(), dst.resolve()], timeout=3600)


def image_inputs(req: AppVersionRequest) -> list[Path]:
    """Every file ``package-image`` would read for ``req``, each checked (see :mod:`boincvm.image.refs`).

    Raises:
        PathEscapeError: a reference leaves its image's directory or goes through a symbolic link.
        InputError: a file is missing, not a regular file, or not a readable image.
    """
    found: list[Path] = []
    if is_vmware_vm(req.image):
        vm = collect_vm(req.image, snapshot=base_snapshot(dict(req.backend_options)))
        found += [vm.root, *(f.path for f in vm.files)]
    elif req.image.is_dir() and not req.image.is_symlink():
        found += [req.image, *(r.path for r in inspect_image_dir(req.image))]
    elif looks_like_kernel(req.image):
        check_regular(req.image, f"kernel {req.image}")
        found.append(req.image)
    else:
        found += [
            r.path
            for r in inspect_disk(req.image, what=req.image.name, declared=declared_format(req.image)).files
        ]
    if req.initrd is not None:
        check_regular(req.initrd, f"initrd {req.initrd}")
        found.append(req.initrd)
    if req.disk is not None:
        found += [
            r.path
            for r in inspect_disk(req.disk, what=req.disk.name, declared=declared_format(req.disk)).files
        ]
    return found


def package_image(req: AppVersionRequest, progress: Progress | None = None) -> AppVersion:
    """Make an app version directory from a base image.

    Raises:
        InputError: bad request, unreadable image, a VMware VM that cannot be shipped, or the
            output exists (without force).
        PathEscapeError: a VMware VM's file reference is absolute or leaves its directory.
        ToolError: qemu-img is missing or failed.
    """
    vnum = version_num(req.version)
    key = None
    if req.sign_key is not None:
        key = load_private_key(req.sign_key)  # fail before any work if the key is unusable
        if req.sign_key.resolve().parent == req.output_dir.resolve():
            raise InputError("the private key may not live in the app version directory")
    # These become directory and file names on the project server (and the default -o).
    check_identifier(req.app_name, "app name")
    check_identifier(req.platform, "platform")
    if req.plan_class is not None:
        check_identifier(req.plan_class, "plan class")
    if req.kvm_cpu_feature not in KVM_CPU_FEATURES:
        raise InputError(
            f"--kvm-cpu-feature {req.kvm_cpu_feature!r} is not a hardware-virtualisation flag",
            hint="use vmx (Intel VT-x) or svm (AMD-V)",
        )
    if req.ncpus is not None and not 1 <= req.ncpus <= 256:  # validate_job's range
        raise InputError(f"--ncpus {req.ncpus} is out of range", hint="give 1 to 256")
    if req.wrapper is WrapperKind.FROZEN and req.platform != FROZEN_PLATFORM:
        raise InputError(
            f"the frozen wrapper runs on {FROZEN_PLATFORM} only, not {req.platform}",
            hint="package with --wrapper pyz for other platforms (the host then needs Python 3.11+)",
        )
    for what, path in (("image", req.image), ("initrd", req.initrd), ("disk", req.disk)):
        if path is not None and not path.exists():
            raise InputError(
                f"{what} {path} does not exist", hint="check the name and that the file is there"
            )

    # Every file the image will cause to be read is checked before anything is written
    # (no reference out of its directory, no symbolic link, no FIFO, a readable image), and
    # the output may not overlap any of them: --force replaces the output whole.
    inputs = image_inputs(req)
    reads = [("the input", p) for p in inputs] + ([("the signing key", req.sign_key)] if req.sign_key else [])
    refuse_output_overlapping(req.output_dir, reads, option="--output-dir")
    if req.runtime is RuntimeKind.BUNDLED and is_vmware_vm(req.image):
        raise InputError(
            "--runtime bundled applies to QEMU app versions only, and this image is a VMware VM",
            hint="drop --runtime (VMware app versions use the host's VMware Workstation or Player)",
        )
    if req.backend_options:
        kind = "vmware" if is_vmware_vm(req.image) else "qemu"
        backend_class(kind).check_options(dict(req.backend_options))
    out = req.output_dir
    with building(out, force=req.force) as tmp, ThreadPoolExecutor(1) as pool:
        # The wrapper is built while qemu-img converts the disk (another process).
        build_wrapper = build_frozen_wrapper if req.wrapper is WrapperKind.FROZEN else build_wrapper_zipapp
        wrapper = pool.submit(build_wrapper, tmp / ".wrapper.part")
        return _package_into(req, tmp, vnum, progress, wrapper, key)


def _package_into(
    req: AppVersionRequest,
    tmp: Path,
    vnum: int,
    progress: Progress | None,
    wrapper: Future[Path],
    key: rsa.RSAPrivateKey | None,
) -> AppVersion:
    prefix = f"{req.app_name}_{req.version}"
    files: list[AppVersionFile] = []

    def note(step: str, done: int = 0, total: int | None = None) -> None:
        if progress is not None:
            progress(step, done, total)

    def add(src: Path, logical: str, *, copy: bool, gzip_ok: bool) -> None:
        note(f"adding {logical}")
        staging = tmp / f".{logical}.part"
        if copy:
            with open_regular(src, f"{logical} source {src}") as fi, staging.open("wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
        else:
            staging = src
        md5, size = _md5(staging)
        physical = f"{prefix}_{md5[:12]}_{logical}"
        (tmp / physical).unlink(missing_ok=True)
        staging.rename(tmp / physical)
        gz = req.gzip_downloads and gzip_ok and _gzip_helps(tmp / physical)
        files.append(AppVersionFile(physical, logical, md5, size, gzip=gz))

    job = VmJob(backend="qemu", memory_size_mb=req.memory_mb)
    exec_dir = req.exec_dir
    container_task: Task | None = None
    if is_vmware_vm(req.image):
        vm_files, job = package_vmware(req, tmp, prefix, note)
        files += vm_files
    elif req.image.is_dir():
        desc = ImageDescriptor.load(req.image / DESCRIPTOR_NAME)
        if desc.format is ImageFormat.KERNEL_INITRD:
            assert desc.kernel is not None
            add(req.image / desc.kernel, KERNEL_OPEN_NAME, copy=True, gzip_ok=True)
            if desc.initrd:
                add(req.image / desc.initrd, INITRD_OPEN_NAME, copy=True, gzip_ok=True)
            job = VmJob(
                backend="qemu",
                vm_kernel=KERNEL_OPEN_NAME,
                vm_initrd=INITRD_OPEN_NAME if desc.initrd else None,
                kernel_cmdline=desc.kernel_cmdline,
                memory_size_mb=req.memory_mb or desc.memory_mb,
            )
        else:
            job = VmJob(backend="qemu", memory_size_mb=req.memory_mb or desc.memory_mb)
        if desc.disk:
            note("converting the disk")
            _convert_disk(req.image / desc.disk, tmp / f".{DISK_OPEN_NAME}.part", compress=req.compress)
            add(tmp / f".{DISK_OPEN_NAME}.part", DISK_OPEN_NAME, copy=False, gzip_ok=False)
            job = VmJob(**{**job.__dict__, "vm_image": DISK_OPEN_NAME})
        exec_dir = exec_dir or desc.exec_dir
        # A guest made from a container image: its program, environment and user.
        container_task = image_task(req.image)
    elif looks_like_kernel(req.image):
        add(req.image, KERNEL_OPEN_NAME, copy=True, gzip_ok=True)
        if req.initrd is not None:
            add(req.initrd, INITRD_OPEN_NAME, copy=True, gzip_ok=True)
        job = VmJob(
            backend="qemu",
            vm_kernel=KERNEL_OPEN_NAME,
            vm_initrd=INITRD_OPEN_NAME if req.initrd else None,
            kernel_cmdline=req.kernel_cmdline or "console=ttyS0",
            memory_size_mb=req.memory_mb,
        )
        if req.disk is not None:
            note("converting the disk")
            _convert_disk(req.disk, tmp / f".{DISK_OPEN_NAME}.part", compress=req.compress)
            add(tmp / f".{DISK_OPEN_NAME}.part", DISK_OPEN_NAME, copy=False, gzip_ok=False)
            job = VmJob(**{**job.__dict__, "vm_image": DISK_OPEN_NAME})
    else:
        if req.initrd is not None:
            raise InputError(
                f"{req.image.name} is not a kernel, so --initrd does not apply",
                hint="give a kernel (bzImage or vmlinux) as IMAGE, or drop --initrd",
            )
        note("converting the disk")
        _convert_disk(req.image, tmp / f".{DISK_OPEN_NAME}.part", compress=req.compress)
        add(tmp / f".{DISK_OPEN_NAME}.part", DISK_OPEN_NAME, copy=False, gzip_ok=False)
        job = VmJob(backend="qemu", vm_image=DISK_OPEN_NAME, memory_size_mb=req.memory_mb)
    options = tuple(BackendOption(n, v) for n, v in req.backend_options)
    if (
        job.backend == "qemu"
        and req.runtime is not RuntimeKind.SYSTEM
        and "runtime" not in dict(req.backend_options)
    ):
        note("adding the QEMU runtime")
        add(cached_runtime_archive(), RUNTIME_OPEN_NAME, copy=True, gzip_ok=False)
        options += (BackendOption("runtime", RUNTIME_OPEN_NAME),)
    task = Task(exec_dir=exec_dir) if exec_dir else None
    if container_task is not None:
        task = replace(container_task, exec_dir=exec_dir or container_task.exec_dir)
    job = replace(
        job,
        task=task,
        backend_options=options,
        ncpus=req.ncpus,
        vm_accel_required=True if req.require_kvm else None,
    )
    defaults_xml = render_job(job).encode("utf-8")
    defaults_md5 = hashlib.md5(defaults_xml, usedforsecurity=False).hexdigest()
    defaults_name = f"{prefix}_{defaults_md5[:12]}_vm_job_defaults.xml"
    (tmp / defaults_name).write_bytes(defaults_xml)
    files.append(AppVersionFile(defaults_name, DEFAULTS_OPEN_NAME, defaults_md5, len(defaults_xml)))

    note("adding the wrapper")
    wrapper.result()
    md5, size = _md5(tmp / ".wrapper.part")
    wrapper_name = f"{prefix}_{md5[:12]}_{WRAPPER_FILE_NAMES[req.wrapper]}"
    (tmp / ".wrapper.part").rename(tmp / wrapper_name)
    files.insert(0, AppVersionFile(wrapper_name, None, md5, size, main_program=True))

    if key is not None:
        note("signing the files")
        for f in files:
            (tmp / f"{f.physical_name}.sig").write_text(
                sign_file(tmp / f.physical_name, key), encoding="ascii"
            )

    (tmp / "version.xml").write_text(
        render("version.xml.j2", files=files, api_version=API_VERSION), encoding="utf-8"
    )
    if req.plan_class is not None:
        # Not an app-version file (a dot-name update_versions skips): the project merges it
        # into its own plan_class_spec.xml.
        spec = PlanClassSpec.for_job(req.plan_class, job, kvm_cpu_feature=req.kvm_cpu_feature)
        (tmp / PLAN_CLASS_ENTRY).write_text(spec.render(), encoding="utf-8")
    result = AppVersion(
        req.output_dir, req.app_name, req.version, vnum, req.platform, tuple(files), req.plan_class
    )
    (tmp / SUMMARY_NAME).write_text(
        json.dumps(result.as_dict() | {"directory": "."}, indent=2) + "\n", encoding="utf-8"
    )
    return result


# -- reading and checking ---------------------------------------------------------------------
