"""App versions: a base image -> a BOINC app version directory ready for ``update_versions``.

The image is a disk (qcow2, raw, vmdk), a kernel (+ initramfs), a ``build-image``
directory, or a VMware VM directory; what each kind ships is said in
:mod:`boincvm.image.for_app_version` (and :mod:`boincvm.appversion.vmware`), how the files are
staged in :mod:`boincvm.appversion.staging`.

The directory made by :func:`package_image` is the platform directory of an app version
(``apps/APP/VERSION/PLATFORM[__PLAN_CLASS]/`` in a project)::

    APP_VERSION_<md5>_boincvm-wrapper  main program: the frozen wrapper's /bin/sh launcher, or
                                       APP_VERSION_<md5>_wrapper.pyz, a Python zip application
    APP_VERSION_<md5>_boincvm-wrapper-static, APP_VERSION_wrapper_runtime.tar.xz
                                       (frozen) the static wrapper, and the wrapper's runtime
                                       the launcher starts once it is unpacked
                                       (:mod:`boincvm.appversion.wrapper_runtime`)
    APP_VERSION_vm_job_defaults.xml    logical name vm_job_defaults.xml: image, memory, guest dirs
    APP_VERSION_<md5>_vmlinux ...      the image files, logical names vm_kernel, vm_initrd, vm_disk.qcow2
    version.xml                        files, logical names, <is_wrapper/>, <dont_throttle/>, api_version
    .boincvm-app-version.json          what boincvm made (read by validate and run-local; a dot-name,
                                       which update_versions skips, so volunteers never download it)

A Windows app version (``--wsl-wrapper``, :mod:`boincvm.appversion.wsl`) has BOINC's
``APP_VERSION_<md5>_wsl_wrapper.exe`` as its main program instead, and the frozen wrapper
with the logical name ``main`` and ``<copy_file/>``; the other files are the same.

Physical names carry the version and content hash, so they are globally unique and
immutable as BOINC requires. Images are never inflated: ``qemu-img convert`` keeps holes
and compresses qcow2 clusters; files that compress well get BOINC's ``<gzip/>`` download
compression.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from boincvm.appversion.frozen import build_frozen_wrapper
from boincvm.appversion.model import (
    API_VERSION,
    FROZEN_PLATFORM,
    RUNTIME_OPEN_NAME,
    STATIC_WRAPPER_TAIL,
    SUMMARY_NAME,
    WRAPPER_FILE_NAMES,
    WRAPPER_RUNTIME_OPEN_NAME,
    AppVersion,
    AppVersionRequest,
    Progress,
    RuntimeKind,
    WrapperKind,
    version_num,
)
from boincvm.appversion.plan_class import ENTRY_NAME as PLAN_CLASS_ENTRY
from boincvm.appversion.plan_class import KVM_CPU_FEATURES, PlanClassSpec
from boincvm.appversion.runtime import cached_runtime_archive
from boincvm.appversion.staging import StagedFiles, copy_hashed
from boincvm.appversion.vmware import base_snapshot, vmware_parts
from boincvm.appversion.wrapper_runtime import launcher_script, wrapper_runtime_archive
from boincvm.appversion.wsl import EXE_TAIL, MAIN_OPEN_NAME, check_wsl_request
from boincvm.appversion.wsl import PLATFORM as WSL_PLATFORM
from boincvm.appversion.zipapp import build_wrapper_zipapp
from boincvm.atomicdir import building
from boincvm.errors import InputError
from boincvm.hypervisor.base import BackendKind, backend_class
from boincvm.hypervisor.vmware.files import collect_vm
from boincvm.image.for_app_version import (
    ImageKind,
    ImageParts,
    ImageSource,
    ShippedFile,
    directory_parts,
    disk_parts,
    image_kind,
    kernel_parts,
)
from boincvm.image.refs import declared_format, inspect_disk, inspect_image_dir
from boincvm.job import DEFAULTS_OPEN_NAME, BackendOption, VmJob, with_task
from boincvm.job.render import render_job
from boincvm.names import check_identifier
from boincvm.paths import check_regular, refuse_output_overlapping
from boincvm.render import render
from boincvm.signing import load_private_key
from boincvm.unpacked import WRAPPER

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

#: What each kind of image gives the app version.
IMAGE_PARTS: dict[ImageKind, Callable[[ImageSource], ImageParts]] = {
    ImageKind.VMWARE_VM: vmware_parts,
    ImageKind.DIRECTORY: directory_parts,
    ImageKind.KERNEL: kernel_parts,
    ImageKind.DISK: disk_parts,
}


def image_inputs(req: AppVersionRequest) -> list[Path]:
    """Every file ``package-image`` would read for ``req``, each checked (see :mod:`boincvm.image.refs`).

    Raises:
        PathEscapeError: a reference leaves its image's directory or goes through a symbolic link.
        InputError: a file is missing, not a regular file, or not a readable image.
    """
    found: list[Path] = []
    match image_kind(req.image):
        case ImageKind.VMWARE_VM:
            vm = collect_vm(req.image, snapshot=base_snapshot(dict(req.backend_options)))
            found += [vm.root, *(f.path for f in vm.files)]
        case ImageKind.DIRECTORY:
            found += [req.image, *(r.path for r in inspect_image_dir(req.image))]
        case ImageKind.KERNEL:
            check_regular(req.image, f"kernel {req.image}")
            found.append(req.image)
        case ImageKind.DISK:
            found += _disk_files(req.image)
    if req.initrd is not None:
        check_regular(req.initrd, f"initrd {req.initrd}")
        found.append(req.initrd)
    if req.disk is not None:
        found += _disk_files(req.disk)
    return found


def _disk_files(disk: Path) -> list[Path]:
    """A disk image and every file it refers to, each checked."""
    return [r.path for r in inspect_disk(disk, what=disk.name, declared=declared_format(disk)).files]


def package_image(req: AppVersionRequest, progress: Progress | None = None) -> AppVersion:
    """Make an app version directory from a base image.

    Raises:
        InputError: bad request, unreadable image, a VMware VM that cannot be shipped, a
            ``wsl_wrapper`` that is no Windows x86-64 program, or the output exists (without force).
        PathEscapeError: a VMware VM's file reference is absolute or leaves its directory.
        ToolError: qemu-img is missing or failed.
    """
    vnum = version_num(req.version)
    key = None
    if req.sign_key is not None:
        key = load_private_key(req.sign_key)  # fail before any work if the key is unusable
        if req.sign_key.resolve().parent == req.output_dir.resolve():
            raise InputError("the private key may not live in the app version directory")
    _check_request(req)

    # Every file the image will cause to be read is checked before anything is written
    # (no reference out of its directory, no symbolic link, no FIFO, a readable image), and
    # the output may not overlap any of them: --force replaces the output whole.
    inputs = image_inputs(req)
    reads = [("the input", p) for p in inputs]
    reads += [("the signing key", req.sign_key)] if req.sign_key else []
    reads += [("the WSL wrapper", req.wsl_wrapper)] if req.wsl_wrapper else []
    refuse_output_overlapping(req.output_dir, reads, option="--output-dir")
    backend = image_kind(req.image).backend
    check_wsl_request(req, backend)
    if req.runtime is RuntimeKind.BUNDLED and backend is BackendKind.VMWARE:
        raise InputError(
            "--runtime bundled applies to QEMU app versions only, and this image is a VMware VM",
            hint="drop --runtime (VMware app versions use the host's VMware Workstation or Player)",
        )
    if req.backend_options:
        backend_class(backend).check_options(dict(req.backend_options))
    out = req.output_dir
    with building(out, force=req.force) as tmp, ThreadPoolExecutor(1) as pool:
        # The wrapper is built while qemu-img converts the disk (another process).
        build_wrapper = build_frozen_wrapper if req.wrapper is WrapperKind.FROZEN else build_wrapper_zipapp
        wrapper = pool.submit(build_wrapper, tmp / ".wrapper.part")
        runtime = None
        if req.wrapper is WrapperKind.FROZEN and req.wsl_wrapper is None:
            runtime = pool.submit(wrapper_runtime_archive)
        return _package_into(req, tmp, vnum, progress, (wrapper, runtime), key)


def _check_request(req: AppVersionRequest) -> None:
    """Refuse a request whose names or numbers are bad, before any file is read.

    Raises:
        InputError: a bad name, CPU flag or count, a platform the wrapper does not run on, or a
            missing input.
    """
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
    # Through WSL the frozen wrapper runs on Linux whatever the platform (checked with the rest
    # of the WSL request).
    if req.wrapper is WrapperKind.FROZEN and req.platform != FROZEN_PLATFORM and req.wsl_wrapper is None:
        hint = "package with --wrapper pyz for other platforms (the host then needs Python 3.11+)"
        if req.platform == WSL_PLATFORM:
            hint += "; for Windows, --wsl-wrapper wsl_wrapper.exe runs the frozen wrapper through WSL"
        raise InputError(f"the frozen wrapper runs on {FROZEN_PLATFORM} only, not {req.platform}", hint=hint)
    for what, path in (("image", req.image), ("initrd", req.initrd), ("disk", req.disk)):
        if path is not None and not path.exists():
            raise InputError(
                f"{what} {path} does not exist", hint="check the name and that the file is there"
            )


def _package_into(
    req: AppVersionRequest,
    tmp: Path,
    vnum: int,
    progress: Progress | None,
    wrapper: tuple[Future[Path], Future[Path] | None],
    key: rsa.RSAPrivateKey | None,
) -> AppVersion:
    staged = StagedFiles(
        tmp,
        f"{req.app_name}_{req.version}",
        progress,
        gzip_downloads=req.gzip_downloads,
        compress=req.compress,
    )
    source = ImageSource(req.image, req.initrd, req.kernel_cmdline, req.disk, req.backend_options)
    parts = IMAGE_PARTS[image_kind(req.image)](source)
    for shipped in parts.files:
        staged.add(shipped)
    if parts.recheck is not None:
        parts.recheck()
    job = _job_defaults(req, parts, _add_runtime(req, parts, staged))
    staged.add_bytes(render_job(job).encode("utf-8"), DEFAULTS_OPEN_NAME, "vm_job_defaults.xml")
    staged.note("adding the wrapper")
    built, runtime = wrapper[0].result(), wrapper[1]
    if runtime is not None:
        _add_launcher(staged, built, runtime.result())
    elif req.wsl_wrapper is None:
        staged.add_main_program(built, WRAPPER_FILE_NAMES[req.wrapper])
    else:
        staged.add_copied_program(tmp / ".wrapper.part", WRAPPER_FILE_NAMES[req.wrapper], MAIN_OPEN_NAME)
        staged.note("adding wsl_wrapper.exe")
        staged.add_main_program(_stage_exe(req.wsl_wrapper, tmp), EXE_TAIL)
    if key is not None:
        staged.sign(key)
    return _write_descriptions(req, tmp, vnum, job, staged)


def _add_launcher(staged: StagedFiles, static: Path, runtime: Path) -> None:
    """The frozen wrapper of a Linux app version: the static executable, the wrapper's runtime
    and, as the main program, the launcher that starts one or the other."""
    static_name = staged.add_program(static, STATIC_WRAPPER_TAIL)
    staged.note("adding the wrapper's runtime")
    staged.add(ShippedFile.copy(runtime, WRAPPER_RUNTIME_OPEN_NAME, gzip_ok=False))
    archive = staged.files[-1]
    launcher = staged.directory / ".launcher.part"
    launcher.write_bytes(
        launcher_script(
            static=static_name,
            archive=archive.physical_name,
            unpacked=WRAPPER.directory_name(staged.directory / archive.physical_name),
        )
    )
    launcher.chmod(0o755)
    staged.add_main_program(launcher, WRAPPER_FILE_NAMES[WrapperKind.FROZEN])


def _stage_exe(exe: Path, tmp: Path) -> Path:
    """Copy the admin's ``wsl_wrapper.exe`` into the directory being built, executable:
    update_versions marks a file ``<executable/>`` from its mode, and the client runs no main
    program without it."""
    staging = tmp / f".{EXE_TAIL}.part"
    copy_hashed(exe, staging, what="--wsl-wrapper", estimate_gzip=False)
    staging.chmod(0o755)
    return staging


def _add_runtime(req: AppVersionRequest, parts: ImageParts, staged: StagedFiles) -> tuple[BackendOption, ...]:
    """Ship the bundled QEMU unless the image is not QEMU's or the admin said otherwise; return
    the backend options of the job defaults (with ``runtime`` when it is shipped)."""
    options = tuple(BackendOption(n, v) for n, v in req.backend_options)
    if (
        parts.backend is BackendKind.QEMU
        and req.runtime is not RuntimeKind.SYSTEM
        and "runtime" not in dict(req.backend_options)
    ):
        staged.note("adding the QEMU runtime")
        staged.add(ShippedFile.copy(cached_runtime_archive(), RUNTIME_OPEN_NAME, gzip_ok=False))
        options += (BackendOption("runtime", RUNTIME_OPEN_NAME),)
    return options


def _job_defaults(req: AppVersionRequest, parts: ImageParts, options: tuple[BackendOption, ...]) -> VmJob:
    """``vm_job_defaults.xml``: what the image says, overridden by what the admin asked for."""
    job = with_task(parts.job, exec_dir=req.exec_dir) if req.exec_dir else parts.job
    return replace(
        job,
        backend=parts.backend.value,
        memory_mb=req.memory_mb or job.memory_mb,
        ncpus=req.ncpus,
        vm_accel_required=True if req.require_kvm else None,
        backend_options=options,
    )


def _write_descriptions(
    req: AppVersionRequest, tmp: Path, vnum: int, job: VmJob, staged: StagedFiles
) -> AppVersion:
    """``version.xml``, the plan class entry and package-image's summary."""
    files = staged.files
    (tmp / "version.xml").write_text(
        render("version.xml.j2", files=files, api_version=API_VERSION), encoding="utf-8"
    )
    if req.plan_class is not None:
        # Not an app-version file (a dot-name update_versions skips): the project merges it
        # into its own plan_class_spec.xml.
        spec = PlanClassSpec.for_job(
            req.plan_class, job, kvm_cpu_feature=req.kvm_cpu_feature, wsl=req.wsl_wrapper is not None
        )
        (tmp / PLAN_CLASS_ENTRY).write_text(spec.render(), encoding="utf-8")
    result = AppVersion(
        req.output_dir,
        req.app_name,
        req.version,
        vnum,
        req.platform,
        tuple(files),
        req.plan_class,
        wsl=req.wsl_wrapper is not None,
    )
    (tmp / SUMMARY_NAME).write_text(
        json.dumps(result.as_dict() | {"directory": "."}, indent=2) + "\n", encoding="utf-8"
    )
    return result
