"""What an app version takes from each kind of image: the files it ships and the VM settings.

``package-image`` accepts four kinds of image (:class:`ImageKind`). For each, one function
says what the app version needs (:class:`ImageParts`): the files to add under which logical
names (copied as they are, or converted to a qcow2 first) and what the job defaults say of
the VM (its image or kernel, the memory the image suggests, the working directory). The
three QEMU kinds are here; a VMware VM's counterpart is
:func:`boincvm.appversion.vmware.vmware_parts`, which reads the VM directory through the
VMware backend's own module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from boincvm import proc
from boincvm.errors import InputError
from boincvm.hypervisor.base import BackendKind
from boincvm.image.descriptor import DESCRIPTOR_NAME, IMAGE_JOB_NAME, ImageDescriptor, ImageFormat
from boincvm.image.elf import looks_like_kernel
from boincvm.image.refs import declared_format, inspect_disk
from boincvm.job import Task, VmJob, load_job, with_task

KERNEL_OPEN_NAME = "vm_kernel"
INITRD_OPEN_NAME = "vm_initrd"
DISK_OPEN_NAME = "vm_disk.qcow2"
#: The kernel command line of a bare kernel given without one.
DEFAULT_KERNEL_CMDLINE = "console=ttyS0"


class ImageKind(StrEnum):
    """The kinds of image ``package-image`` takes."""

    #: A VMware VM: its directory or its ``.vmx``.
    VMWARE_VM = "vmware-vm"
    #: A directory with ``boincvm-image.json`` (``build-image`` makes them).
    DIRECTORY = "directory"
    #: A Linux kernel (bzImage or vmlinux), with an optional initramfs and disk.
    KERNEL = "kernel"
    #: A disk image: qcow2, raw or vmdk.
    DISK = "disk"

    @property
    def backend(self) -> BackendKind:
        """The hypervisor that runs this kind of image."""
        return BackendKind.VMWARE if self is ImageKind.VMWARE_VM else BackendKind.QEMU


def is_vmware_vm(path: Path) -> bool:
    """True for a ``.vmx`` file or a directory holding one (and no ``boincvm-image.json``)."""
    if path.is_dir():
        has_vmx = any(p.suffix.lower() == ".vmx" for p in path.iterdir())
        return has_vmx and not (path / DESCRIPTOR_NAME).exists()
    return path.suffix.lower() == ".vmx"


def image_kind(image: Path) -> ImageKind:
    """Which kind of image ``image`` is (a symbolic link to a directory is none: it is
    refused as a disk image)."""
    if is_vmware_vm(image):
        return ImageKind.VMWARE_VM
    if image.is_dir() and not image.is_symlink():
        return ImageKind.DIRECTORY
    if looks_like_kernel(image):
        return ImageKind.KERNEL
    return ImageKind.DISK


@dataclass(frozen=True)
class ImageSource:
    """The image package-image was given and what the admin said with it.

    Attributes:
        image: the image (see :class:`ImageKind`).
        initrd: with a kernel: its initramfs.
        kernel_cmdline: with a kernel: its command line.
        disk: with a kernel: a disk to attach.
        backend_options: (name, value) settings for the backend (a VMware VM's base snapshot).
    """

    image: Path
    initrd: Path | None = None
    kernel_cmdline: str | None = None
    disk: Path | None = None
    backend_options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ShippedFile:
    """One file of the image that becomes an app-version file.

    Attributes:
        source: the file to read.
        logical_name: its name in the slot.
        tail: the physical name's end, after the version and the md5.
        label: what progress lines call it.
        what: what error messages call it (followed by its path).
        convert: convert it to a (compressed) qcow2 rather than copy it.
        gzip_ok: worth BOINC's ``<gzip/>`` if it compresses well.
    """

    source: Path
    logical_name: str
    tail: str
    label: str
    what: str
    convert: bool = False
    gzip_ok: bool = True

    @classmethod
    def copy(cls, source: Path, logical_name: str, *, gzip_ok: bool = True) -> ShippedFile:
        """A file shipped as it is, named after its logical name."""
        return cls(
            source, logical_name, logical_name, logical_name, f"{logical_name} source", gzip_ok=gzip_ok
        )

    @classmethod
    def disk(cls, source: Path) -> ShippedFile:
        """A disk image shipped as a qcow2 (its clusters compressed already: no ``<gzip/>``)."""
        return cls(
            source, DISK_OPEN_NAME, DISK_OPEN_NAME, DISK_OPEN_NAME, "disk", convert=True, gzip_ok=False
        )


@dataclass(frozen=True)
class ImageParts:
    """What an app version needs from its image.

    Attributes:
        files: the files to ship, in this order.
        backend: the hypervisor that runs the image.
        job: what the image says of the job defaults: its image, kernel and initrd (logical
            names) and kernel command line, the memory and working directory it suggests, the
            task it carries (a container's program, environment and user), a multi-file
            image's files (a VMware VM directory).
        recheck: called once the files are copied; raises when the copies may be torn.
    """

    files: tuple[ShippedFile, ...]
    backend: BackendKind = BackendKind.QEMU
    job: VmJob = field(default_factory=VmJob)
    recheck: Callable[[], None] | None = None


def image_task(image_dir: Path) -> Task | None:
    """The task a container guest's directory carries (``boincvm-job.xml``), or None for other images.

    Raises:
        InputError, XmlError: the file is there but unreadable or not a valid vm job.
    """
    path = image_dir / IMAGE_JOB_NAME
    if not path.is_file():
        return None
    return load_job(path).task


def directory_parts(source: ImageSource) -> ImageParts:
    """A ``build-image`` directory: what its descriptor names, and a container guest's task.

    Raises:
        InputError: the descriptor is unreadable.
        InputError, XmlError: a container guest's task file is unreadable or invalid.
    """
    directory = source.image
    desc = ImageDescriptor.load(directory / DESCRIPTOR_NAME)
    files: list[ShippedFile] = []
    kernel = initrd = cmdline = None
    if desc.format is ImageFormat.KERNEL_INITRD:
        assert desc.kernel is not None
        files.append(ShippedFile.copy(directory / desc.kernel, KERNEL_OPEN_NAME))
        kernel, cmdline = KERNEL_OPEN_NAME, desc.kernel_cmdline
        if desc.initrd:
            files.append(ShippedFile.copy(directory / desc.initrd, INITRD_OPEN_NAME))
            initrd = INITRD_OPEN_NAME
    if desc.disk:
        files.append(ShippedFile.disk(directory / desc.disk))
    job = VmJob(
        vm_image=DISK_OPEN_NAME if desc.disk else None,
        vm_kernel=kernel,
        vm_initrd=initrd,
        kernel_cmdline=cmdline,
        memory_mb=desc.memory_mb,
        task=image_task(directory),
    )
    # The descriptor's working directory wins over the one a container's task names.
    return ImageParts(tuple(files), job=with_task(job, exec_dir=desc.exec_dir) if desc.exec_dir else job)


def kernel_parts(source: ImageSource) -> ImageParts:
    """A bare kernel, with the initramfs and the disk given with it."""
    files = [ShippedFile.copy(source.image, KERNEL_OPEN_NAME)]
    if source.initrd is not None:
        files.append(ShippedFile.copy(source.initrd, INITRD_OPEN_NAME))
    if source.disk is not None:
        files.append(ShippedFile.disk(source.disk))
    job = VmJob(
        vm_image=DISK_OPEN_NAME if source.disk is not None else None,
        vm_kernel=KERNEL_OPEN_NAME,
        vm_initrd=INITRD_OPEN_NAME if source.initrd is not None else None,
        kernel_cmdline=source.kernel_cmdline or DEFAULT_KERNEL_CMDLINE,
    )
    return ImageParts(tuple(files), job=job)


def disk_parts(source: ImageSource) -> ImageParts:
    """A disk image (qcow2, raw, vmdk), shipped as a qcow2.

    Raises:
        InputError: an initrd was given with it.
    """
    if source.initrd is not None:
        raise InputError(
            f"{source.image.name} is not a kernel, so --initrd does not apply",
            hint="give a kernel (bzImage or vmlinux) as IMAGE, or drop --initrd",
        )
    return ImageParts((ShippedFile.disk(source.image),), job=VmJob(vm_image=DISK_OPEN_NAME))


def convert_disk(src: Path, dst: Path, *, compress: bool) -> None:
    """Convert a disk to a (compressed) qcow2, once its whole reference chain has been checked.

    Raises:
        PathEscapeError: the disk refers to a file outside its directory, or through a symbolic link.
        InputError: not a readable image of its declared format, too small, or with a backing file.
        ToolError: qemu-img is missing or failed.
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
