"""The descriptor every built image directory carries: ``boincvm-image.json``.

It says what the image is made of and how to boot it, so a backend (or ``validate``)
never has to guess from file names::

    {
      "schema": 1,
      "format": "kernel+initrd",
      "kernel": "vmlinux",
      "initrd": "initramfs.cpio",
      "disk": "scratch.qcow2",
      "disk_format": "qcow2",
      "kernel_cmdline": "console=ttyS0 panic=-1 ...",
      "guest_tools": "qemu-ga",
      "exec_dir": "/scratch/boincvm",
      "memory_mb": 256,
      "recipe": "minimal",
      "input_hash": "3f2a...",
      "packages": {"qemu-guest-agent": "1:7.2+dfsg-7+deb12u18+b3", ...}
    }
"""

from __future__ import annotations

import enum
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boincvm.errors import InputError
from boincvm.hypervisor.base import VmSpec

if TYPE_CHECKING:
    from boincvm.hypervisor.base import VmSpec

DESCRIPTOR_NAME = "boincvm-image.json"
#: The vm job (only a task) a container guest's directory carries for package-image.
IMAGE_JOB_NAME = "boincvm-job.xml"
SCHEMA = 1


class ImageFormat(enum.StrEnum):
    """How an image boots."""

    KERNEL_INITRD = "kernel+initrd"
    QCOW2 = "qcow2"
    RAW = "raw"
    VMDK = "vmdk"


@dataclass(frozen=True)
class ImageDescriptor:
    """What ``boincvm-image.json`` says about an image directory.

    File names are relative to the directory holding the descriptor.

    Attributes:
        format: how the image boots.
        kernel: the kernel file (``kernel+initrd`` images), else None.
        initrd: the initramfs file (``kernel+initrd`` images), else None.
        disk: the base disk (the scratch disk of a ``kernel+initrd`` image, the boot disk otherwise).
        disk_format: qcow2, raw or vmdk.
        kernel_cmdline: the kernel command line the image expects.
        guest_tools: the guest tools it runs (``qemu-ga`` or ``vmware-tools``).
        exec_dir: where jobs run inside the guest.
        memory_mb: a memory size that suits the image.
        recipe: the recipe that built it (empty for images made elsewhere).
        input_hash: the content hash of everything the build used.
        packages: Debian package name -> version that went into the image.
    """

    format: ImageFormat
    kernel: str | None = None
    initrd: str | None = None
    disk: str | None = None
    disk_format: str = "qcow2"
    kernel_cmdline: str = ""
    guest_tools: str = "qemu-ga"
    exec_dir: str = "/scratch/boincvm"
    memory_mb: int = 256
    recipe: str = ""
    input_hash: str = ""
    packages: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (with the schema number)."""
        return {
            "schema": SCHEMA,
            "format": self.format.value,
            "kernel": self.kernel,
            "initrd": self.initrd,
            "disk": self.disk,
            "disk_format": self.disk_format,
            "kernel_cmdline": self.kernel_cmdline,
            "guest_tools": self.guest_tools,
            "exec_dir": self.exec_dir,
            "memory_mb": self.memory_mb,
            "recipe": self.recipe,
            "input_hash": self.input_hash,
            "packages": dict(sorted(self.packages.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, place: str = DESCRIPTOR_NAME) -> ImageDescriptor:
        """Build a descriptor from parsed JSON.

        Raises:
            InputError: a field is missing, of the wrong type, or names a path outside the directory.
        """
        if data.get("schema") != SCHEMA:
            raise InputError(f"{place}.schema: expected {SCHEMA}, got {data.get('schema')!r}")
        try:
            fmt = ImageFormat(data["format"])
        except (KeyError, ValueError):
            known = ", ".join(f.value for f in ImageFormat)
            raise InputError(f"{place}.format: must be one of {known}") from None

        def opt_name(key: str) -> str | None:
            value = data.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
                raise InputError(f"{place}.{key}: must be a plain file name, got {value!r}")
            return value

        def text(key: str, default: str) -> str:
            value = data.get(key, default)
            if not isinstance(value, str):
                raise InputError(f"{place}.{key}: must be a string")
            return value

        memory = data.get("memory_mb", 256)
        if not isinstance(memory, int) or memory < 16:
            raise InputError(f"{place}.memory_mb: must be an integer >= 16")
        packages = data.get("packages", {})
        if not isinstance(packages, dict) or not all(isinstance(v, str) for v in packages.values()):
            raise InputError(f"{place}.packages: must map package names to versions")
        desc = cls(
            format=fmt,
            kernel=opt_name("kernel"),
            initrd=opt_name("initrd"),
            disk=opt_name("disk"),
            disk_format=text("disk_format", "qcow2"),
            kernel_cmdline=text("kernel_cmdline", ""),
            guest_tools=text("guest_tools", "qemu-ga"),
            exec_dir=text("exec_dir", "/scratch/boincvm"),
            memory_mb=memory,
            recipe=text("recipe", ""),
            input_hash=text("input_hash", ""),
            packages=dict(packages),
        )
        if fmt is ImageFormat.KERNEL_INITRD and (desc.kernel is None or desc.initrd is None):
            raise InputError(f"{place}: a kernel+initrd image must name its kernel and initrd")
        if fmt is not ImageFormat.KERNEL_INITRD and desc.disk is None:
            raise InputError(f"{place}.disk: a {fmt.value} image must name its disk")
        return desc

    @classmethod
    def load(cls, path: Path) -> ImageDescriptor:
        """Read the descriptor of an image directory (or the descriptor file itself).

        Raises:
            InputError: the file is missing, not JSON, or not a valid descriptor.
        """
        file = path / DESCRIPTOR_NAME if path.is_dir() else path
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(
                f"{file}: no image descriptor here", hint="build one with: boincvm build-image"
            ) from None
        except (OSError, ValueError) as exc:
            raise InputError(f"{file}: cannot read the image descriptor: {exc}") from exc
        if not isinstance(data, dict):
            raise InputError(f"{file}: the image descriptor must be a JSON object")
        return cls.from_dict(data, place=file.name)

    def save(self, directory: Path) -> Path:
        """Write ``boincvm-image.json`` into ``directory`` atomically and return its path."""
        target = directory / DESCRIPTOR_NAME
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".descriptor-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        Path(tmp).chmod(0o644)
        Path(tmp).replace(target)
        return target


def spec_for_image(image_dir: Path, *, name: str, workdir: Path, **overrides: Any) -> VmSpec:
    """A :class:`~boincvm.hypervisor.base.VmSpec` booting the image in ``image_dir``.

    ``overrides`` replace any VmSpec field (``memory_mb``, ``boot_timeout``, ``options`` ...).

    Raises:
        InputError: the directory has no valid descriptor.
    """
    desc = ImageDescriptor.load(image_dir)
    fields: dict[str, Any] = {
        "name": name,
        "workdir": workdir,
        "image": image_dir / desc.disk if desc.disk else None,
        "kernel": image_dir / desc.kernel if desc.kernel else None,
        "initrd": image_dir / desc.initrd if desc.initrd else None,
        "kernel_cmdline": desc.kernel_cmdline,
        "memory_mb": desc.memory_mb,
    }
    fields.update(overrides)
    return VmSpec(**fields)
