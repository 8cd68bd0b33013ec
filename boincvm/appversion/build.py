"""App versions: a base image -> a BOINC app version directory ready for ``update_versions``.

The image is a disk (qcow2, raw, vmdk), a kernel (+ initramfs), a ``build-image``
directory, or a VMware VM directory (see :mod:`boincvm.appversion.vmware`).

The directory made by :func:`package_image` is the platform directory of an app version
(``apps/APP/VERSION/PLATFORM[__PLAN_CLASS]/`` in a project)::

    APP_VERSION_<md5>_wrapper.pyz      main program: the wrapper (a Python zip application)
    APP_VERSION_vm_job_defaults.xml    logical name vm_job_defaults.xml: image, memory, guest dirs
    APP_VERSION_<md5>_vmlinux ...      the image files, logical names vm_kernel, vm_initrd, vm_disk.qcow2
    version.xml                        files, logical names, <is_wrapper/>, <dont_throttle/>, api_version
    boincvm-app-version.json           what boincvm made (read by validate and run-local)

Physical names carry the version and content hash, so they are globally unique and
immutable as BOINC requires. Images are never inflated: ``qemu-img convert`` keeps holes
and compresses qcow2 clusters; files that compress well get BOINC's ``<gzip/>`` download
compression.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from boincvm import proc

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa
from boincvm.atomicdir import building
from boincvm.errors import InputError
from boincvm.findings import Finding, error, has_errors, info, warning
from boincvm.image.refs import declared_format, inspect_disk
from boincvm.job import (
    DEFAULTS_OPEN_NAME,
    BackendOption,
    Task,
    VmJob,
    parse_job,
    render_job,
    validate_job,
)
from boincvm.names import check_identifier, logical_name_problem
from boincvm.paths import check_regular, open_regular, refuse_output_overlapping
from boincvm.xmlio import parse_xml, read_bytes, text_of

SUMMARY_NAME = "boincvm-app-version.json"
KERNEL_OPEN_NAME = "vm_kernel"
INITRD_OPEN_NAME = "vm_initrd"
DISK_OPEN_NAME = "vm_disk.qcow2"
#: BOINC API version declared so the client uses the memory-mapped channel (>= 7).
API_VERSION = "7.20.0"
#: Use <gzip/> only when it saves at least this fraction of the download.
GZIP_MIN_SAVING = 0.10

Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class AppVersionFile:
    """One file of an app version."""

    physical_name: str
    logical_name: str | None
    md5: str
    nbytes: int
    main_program: bool = False
    gzip: bool = False


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


@dataclass(frozen=True)
class AppVersion:
    """The result of ``package_image``."""

    directory: Path
    app_name: str
    version: str
    version_num: int
    platform: str
    files: tuple[AppVersionFile, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "directory": str(self.directory),
            "app_name": self.app_name,
            "version": self.version,
            "version_num": self.version_num,
            "platform": self.platform,
            "files": [f.__dict__ for f in self.files],
        }


def looks_like_kernel(path: Path) -> bool:
    """A Linux kernel: an ELF vmlinux or a bzImage (``HdrS`` at 0x202)."""
    try:
        with open_regular(path, f"image {path}") as f:  # a FIFO or a link is no kernel (and must not hang us)
            head = f.read(0x210)
    except (OSError, InputError):
        return False
    return head[:4] == b"\x7fELF" or head[0x202:0x206] == b"HdrS"


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


def _md5(path: Path) -> tuple[str, int]:
    from boincvm.workunit.make import md5_file

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
    from boincvm.appversion.vmware import is_vmware_vm
    from boincvm.image.refs import inspect_image_dir

    found: list[Path] = []
    if is_vmware_vm(req.image):
        from boincvm.appversion.vmware import base_snapshot
        from boincvm.hypervisor.vmware.files import collect_vm

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
        from boincvm.signing import load_private_key

        key = load_private_key(req.sign_key)  # fail before any work if the key is unusable
        if req.sign_key.resolve().parent == req.output_dir.resolve():
            raise InputError("the private key may not live in the app version directory")
    # These become directory and file names on the project server (and the default -o).
    check_identifier(req.app_name, "app name")
    check_identifier(req.platform, "platform")
    if req.plan_class is not None:
        check_identifier(req.plan_class, "plan class")
    for what, path in (("image", req.image), ("initrd", req.initrd), ("disk", req.disk)):
        if path is not None and not path.exists():
            raise InputError(
                f"{what} {path} does not exist", hint="check the name and that the file is there"
            )
    from boincvm.appversion.vmware import is_vmware_vm

    # Every file the image will cause to be read is checked before anything is written
    # (no reference out of its directory, no symbolic link, no FIFO, a readable image), and
    # the output may not overlap any of them: --force replaces the output whole.
    inputs = image_inputs(req)
    reads = [("the input", p) for p in inputs] + ([("the signing key", req.sign_key)] if req.sign_key else [])
    refuse_output_overlapping(req.output_dir, reads, option="--output-dir")
    if req.backend_options:
        from boincvm.hypervisor.base import backend_class

        kind = "vmware" if is_vmware_vm(req.image) else "qemu"
        backend_class(kind).check_options(dict(req.backend_options))
    out = req.output_dir
    with building(out, force=req.force) as tmp, ThreadPoolExecutor(1) as pool:
        from boincvm.appversion.zipapp import build_wrapper_zipapp

        # The wrapper is built while qemu-img converts the disk (another process).
        wrapper = pool.submit(build_wrapper_zipapp, tmp / ".wrapper.part")
        return _package_into(req, tmp, vnum, progress, wrapper, key)


def _package_into(
    req: AppVersionRequest,
    tmp: Path,
    vnum: int,
    progress: Progress | None,
    wrapper: Future[Path],
    key: rsa.RSAPrivateKey | None,
) -> AppVersion:
    from boincvm.image.descriptor import DESCRIPTOR_NAME, ImageDescriptor, ImageFormat

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

    from boincvm.appversion.vmware import is_vmware_vm, package_vmware

    job = VmJob(backend="qemu", memory_size_mb=req.memory_mb)
    exec_dir = req.exec_dir
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
    job = replace(job, task=Task(exec_dir=exec_dir) if exec_dir else None, backend_options=options)
    defaults_xml = render_job(job).encode("utf-8")
    defaults_md5 = hashlib.md5(defaults_xml, usedforsecurity=False).hexdigest()
    defaults_name = f"{prefix}_{defaults_md5[:12]}_vm_job_defaults.xml"
    (tmp / defaults_name).write_bytes(defaults_xml)
    files.append(AppVersionFile(defaults_name, DEFAULTS_OPEN_NAME, defaults_md5, len(defaults_xml)))

    note("adding the wrapper")
    wrapper.result()
    md5, size = _md5(tmp / ".wrapper.part")
    wrapper_name = f"{prefix}_{md5[:12]}_wrapper.pyz"
    (tmp / ".wrapper.part").rename(tmp / wrapper_name)
    files.insert(0, AppVersionFile(wrapper_name, None, md5, size, main_program=True))

    if key is not None:
        from boincvm.signing import sign_file

        note("signing the files")
        for f in files:
            (tmp / f"{f.physical_name}.sig").write_text(
                sign_file(tmp / f.physical_name, key), encoding="ascii"
            )

    from boincvm.render import render

    (tmp / "version.xml").write_text(
        render("version.xml.j2", files=files, api_version=API_VERSION), encoding="utf-8"
    )
    result = AppVersion(req.output_dir, req.app_name, req.version, vnum, req.platform, tuple(files))
    (tmp / SUMMARY_NAME).write_text(
        json.dumps(result.as_dict() | {"directory": "."}, indent=2) + "\n", encoding="utf-8"
    )
    return result


# -- reading and checking ---------------------------------------------------------------------


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
            )
        )
    api = root.find("api_version")
    return VersionXml(
        tuple(files), text_of(api) if api is not None else None, root.find("is_wrapper") is not None
    ), out


def check_app_version(path: Path) -> list[Finding]:
    """Findings for an app version directory (or its version.xml)."""
    directory = path if path.is_dir() else path.parent
    vx_path = directory / "version.xml"
    try:
        vx, out = parse_version_xml(read_bytes(vx_path, what="version.xml"))
    except Exception as exc:  # noqa: BLE001 - every boincvm error becomes a finding here
        from boincvm.errors import BoincvmError

        if isinstance(exc, BoincvmError):
            return [error("version.xml", exc.message, exc.hint)]
        raise
    mains = [f for f in vx.files if f.main_program]
    if len(vx.files) > 1 and len(mains) != 1:
        out.append(
            error(
                "version.file.main_program",
                f"{len(mains)} files are marked <main_program/>; exactly one must be",
            )
        )
    if vx.api_version is None:
        out.append(
            error(
                "version.api_version",
                "is missing",
                hint=f"add <api_version>{API_VERSION}</api_version> so the client uses the mmap channel",
            )
        )
    else:
        try:
            major = int(vx.api_version.split(".")[0])
        except ValueError:
            major = 0
        if major < 7:
            out.append(
                error(
                    "version.api_version",
                    f"{vx.api_version} is below 7",
                    hint="the client uses the memory-mapped channel only with api_version >= 7",
                )
            )
    logical: dict[str, str] = {}
    for f in vx.files:
        if not (directory / f.physical_name).is_file():
            out.append(error(f"version.file.{f.physical_name}", "the file is not in the directory"))
        if f.logical_name:
            if f.logical_name in logical:
                out.append(
                    error(f"version.file.{f.physical_name}.logical_name", f"{f.logical_name!r} is used twice")
                )
            logical[f.logical_name] = f.physical_name
        sig = directory / f"{f.physical_name}.sig"
        if not sig.exists():
            out.append(info(f"version.file.{f.physical_name}", "no .sig file; update_versions will sign it"))
    if not vx.is_wrapper:
        out.append(
            warning(
                "version.is_wrapper",
                "is missing",
                hint="add <is_wrapper/> so the client runs the wrapper at normal priority",
            )
        )
    if DEFAULTS_OPEN_NAME not in logical:
        out.append(
            error(
                f"version.file[{DEFAULTS_OPEN_NAME}]",
                "no file has this logical name",
                hint="the wrapper reads the image and VM settings from it",
            )
        )
    elif (directory / logical[DEFAULTS_OPEN_NAME]).is_file():
        defaults_path = directory / logical[DEFAULTS_OPEN_NAME]
        job, findings = parse_job(defaults_path.read_bytes(), what=defaults_path.name)
        out += [
            Finding(f"{DEFAULTS_OPEN_NAME}:{f.place}", f.message, f.severity, f.hint)
            for f in findings + validate_job(job)
        ]
        for name in ("vm_image", "vm_kernel", "vm_initrd"):
            value = getattr(job, name)
            if value is not None and value not in logical:
                out.append(
                    error(
                        f"{DEFAULTS_OPEN_NAME}:vm_job.{name}",
                        f"{value!r} is not a logical name of this app version",
                    )
                )
        if not job.vm_image and not job.vm_kernel:
            out.append(error(f"{DEFAULTS_OPEN_NAME}:vm_job.vm_image", "the defaults name no image"))
        if job.image_files or job.backend == "vmware":
            from boincvm.appversion.vmware import check_vmware_app_version

            out += check_vmware_app_version(directory, job, logical)
    summary = directory / SUMMARY_NAME
    if summary.is_file() and not has_errors(out):
        try:
            recorded = {f["physical_name"]: f for f in json.loads(summary.read_text())["files"]}
        except (ValueError, KeyError, TypeError):
            out.append(warning(SUMMARY_NAME, "is not readable"))
            recorded = {}
        for phys, rec in recorded.items():
            p = directory / phys
            if p.is_file():
                md5, size = _md5(p)
                if (md5, size) != (rec.get("md5"), rec.get("nbytes")):
                    out.append(
                        error(
                            f"version.file.{phys}",
                            "md5 or size differs from what package-image recorded",
                            hint="app version files are immutable: make a new version instead",
                        )
                    )
    return out
