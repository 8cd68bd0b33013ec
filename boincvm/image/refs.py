"""Every file an image will cause to be read, checked before anything reads it.

A disk image names other files: a qcow2 its backing file and its external data file, a
VMDK descriptor its extents and (for a delta disk) its parent, and each of those may name
more. ``qemu-img`` and QEMU follow these names wherever they point, so an image handed to
an administrator can make ``package-image`` copy ``/etc/shadow`` into an app version, or
``validate --boot`` hand it to a guest as a disk. This module walks the whole chain itself,
reading only headers and descriptors of files already checked, and refuses (through
:mod:`boincvm.paths`) any reference that is absolute, a protocol or JSON filename, or
leaves the image's own directory, and any file that is a symbolic link or not a regular
file. Only then is ``qemu-img info`` asked (per level, never ``--backing-chain``, with the
format fixed by ``-f`` so nothing is probed) whether each file really is a readable image
of its format, and ``qemu-img check`` whether a qcow2 or VMDK is intact.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from boincvm import proc
from boincvm.errors import CommandFailed, InputError
from boincvm.hypervisor.vmware.vmx import read_vmdk_descriptor
from boincvm.image.descriptor import DESCRIPTOR_NAME, ImageDescriptor
from boincvm.paths import check_regular, open_regular, reference

QCOW2_MAGIC = b"QFI\xfb"
#: qcow2 header extension naming the external data file ("DATA").
_QCOW2_EXT_DATA_FILE = 0x44415441
#: qcow2 incompatible feature bit: the guest data lives in an external data file.
_QCOW2_EXTERNAL_DATA = 1 << 2
#: Longest chain of backing files or parent disks followed.
MAX_CHAIN = 64
#: Formats with a suffix that declares them.
SUFFIX_FORMATS = {".qcow2": "qcow2", ".vmdk": "vmdk", ".vdi": "vdi", ".vhdx": "vhdx"}
_CORRUPT_HINT = "the file is corrupt, truncated or not an image at all: make the image again"


@dataclass(frozen=True)
class ImageRef:
    """One file reading an image reads.

    Attributes:
        path: where it is on this host (below the image's directory).
        role: ``disk``, ``backing file``, ``data file``, ``extent``, ``parent disk``,
            ``kernel``, ``initrd`` or ``descriptor``.
        format: the disk format of a disk, backing file or parent (``qcow2``, ``raw``,
            ``vmdk``, ...), else empty.
    """

    path: Path
    role: str
    format: str = ""


@dataclass(frozen=True)
class DiskImage:
    """A disk image whose whole reference chain was checked.

    Attributes:
        path: the disk.
        format: its format, as read from its header (``qemu-img -f`` is given this).
        files: every file reading it reads, the disk first.
        backing: its first backing file (or parent disk), if any.
    """

    path: Path
    format: str
    files: tuple[ImageRef, ...]
    backing: Path | None = None


def sniff_format(head: bytes) -> str:
    """The disk format the first bytes of a file show (``raw`` when none)."""
    if head[:4] == QCOW2_MAGIC:
        return "qcow2"
    if head[:4] in (b"KDMV", b"COWD"):
        return "vmdk"
    if head[:4] == b"QED\x00":
        return "qed"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix":
        return "vpc"
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == 0xBEDA107F:
        return "vdi"
    if b"\x00" not in head[:512]:
        text = head[:4096].decode("utf-8", "replace")
        if "createType" in text and "version" in text:
            return "vmdk"  # a VMDK text descriptor
    return "raw"


def _qcow2_refs(f: BinaryIO, name: str, size: int) -> tuple[str | None, str | None]:
    """The backing file and external data file a qcow2 header names (read from the header only).

    Raises:
        InputError: the header is truncated or inconsistent.
    """

    def corrupt(why: str) -> InputError:
        return InputError(f"{name} is not a readable qcow2 image: {why}", hint=_CORRUPT_HINT)

    f.seek(0)
    head = f.read(104)
    if len(head) < 72:
        raise corrupt(f"the header is cut off after {len(head)} bytes")
    version, backing_off, backing_size, cluster_bits = struct.unpack_from(">IQII", head, 4)
    if version not in (2, 3):
        raise corrupt(f"header version {version} (expected 2 or 3)")
    if not 9 <= cluster_bits <= 21:
        raise corrupt(f"cluster size 2^{cluster_bits}")
    cluster = 1 << cluster_bits
    if size < cluster:
        raise corrupt(f"{size} bytes is less than one cluster ({cluster})")

    def text_at(offset: int, length: int, what: str) -> str:
        if length == 0 or length > 1023 or offset + length > cluster:
            raise corrupt(f"the {what} name lies outside the header")
        f.seek(offset)
        data = f.read(length)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise corrupt(f"the {what} name is not UTF-8") from None

    backing = text_at(backing_off, backing_size, "backing file") if backing_off else None
    data_file = None
    incompatible = 0
    pos = 72
    if version == 3:
        if len(head) < 104:
            raise corrupt("the version 3 header is cut off")
        incompatible = struct.unpack_from(">Q", head, 72)[0]
        pos = struct.unpack_from(">I", head, 100)[0]
    for _ in range(1024):  # header extensions, each padded to 8 bytes, up to an end marker
        if pos + 8 > cluster:
            break
        f.seek(pos)
        ext = f.read(8)
        if len(ext) < 8:
            break
        kind, length = struct.unpack(">II", ext)
        if kind == 0:
            break
        if kind == _QCOW2_EXT_DATA_FILE:
            data_file = text_at(pos + 8, length, "data file")
        pos += 8 + (length + 7) // 8 * 8
    if incompatible & _QCOW2_EXTERNAL_DATA and data_file is None:
        raise corrupt("it keeps its data in an external file it does not name")
    return backing, data_file


def _qemu_img(args: list[str], path: Path, what: str, fmt: str) -> str:
    """Run ``qemu-img`` on an already checked file; a refusal by it is bad input, not a tool failure."""
    try:
        return proc.run(["qemu-img", *args, "-f", fmt, path.resolve()], timeout=300).text
    except CommandFailed as exc:
        if exc.returncode is None:
            raise
        last = exc.stderr_tail.strip().splitlines()[-1:] or [f"exit {exc.returncode}"]
        reason = last[0].removeprefix("qemu-img: ").replace(str(path.resolve()), path.name)
        raise InputError(f"{what} is not a readable {fmt} image: {reason}", hint=_CORRUPT_HINT) from exc


def inspect_disk(
    path: Path, *, what: str = "image", declared: str | None = None, check: bool = True
) -> DiskImage:
    """Check a disk image and every file it refers to, before anything but this reads them.

    Args:
        path: the disk (qcow2, raw, vmdk descriptor or monolithic, or another qemu-img format).
        what: how the disk is named in messages.
        declared: the format something declares for it (a suffix, a descriptor's
            ``disk_format``); None to take the one its header shows.
        check: also ask ``qemu-img`` whether each level is a readable image of its format.

    Raises:
        PathEscapeError: a reference is absolute, a protocol or JSON filename, leaves the
            disk's directory, or a file on the way is a symbolic link.
        InputError: a file is missing or not a regular file, the disk is not of its declared
            format, or is corrupt, truncated, or a VMDK descriptor that names no extents.
        ToolError: qemu-img is missing or timed out.
    """
    root = path.parent
    files: list[ImageRef] = []
    seen: set[Path] = set()
    first_backing: Path | None = None
    current, role, base = path, "disk", ""
    for depth in range(MAX_CHAIN + 1):
        name = what if depth == 0 else f"{what}: {role} {current.relative_to(root)}"
        if current.resolve() in seen:
            raise InputError(f"{name} refers back to itself: the chain loops", hint=_CORRUPT_HINT)
        seen.add(current.resolve())
        fmt, refs, backing = _level(root, base, current, name, check, declared if depth == 0 else None)
        files.append(ImageRef(current, role, fmt))
        files += refs
        if backing is None:
            return DiskImage(path, files[0].format, tuple(files), first_backing)
        if first_backing is None:
            first_backing = backing
        role = "parent disk" if fmt == "vmdk" else "backing file"
        current, base = backing, str(backing.parent.relative_to(root))
    raise InputError(f"{what}: the chain of backing files runs past {MAX_CHAIN}", hint=_CORRUPT_HINT)


def _level(
    root: Path, base: str, path: Path, name: str, check: bool, declared: str | None
) -> tuple[str, list[ImageRef], Path | None]:
    """One level of a chain: its format, the other files it reads, and its backing file or parent."""
    st = check_regular(path, name)
    with open_regular(path, name) as f:
        head = f.read(4096)
        fmt = sniff_format(head)
        backing_name = data_name = None
        if declared is not None and fmt != declared:
            raise InputError(
                f"{name} is not a {declared} image (its header shows {fmt})",
                hint="check the file; it may be truncated or not an image at all",
            )
        if fmt == "qcow2":
            backing_name, data_name = _qcow2_refs(f, name, st.st_size)
    refs: list[ImageRef] = []
    if data_name is not None:
        data = reference(root, base, data_name, f"{name}'s data-file")
        check_regular(data, f"{name}'s data file {data_name}")
        refs.append(ImageRef(data, "data file"))
    if fmt == "vmdk":
        backing_name = _vmdk_refs(root, base, path, name, refs)
    backing = reference(root, base, backing_name, f"{name}'s backing file") if backing_name else None
    if fmt == "raw":
        _check_raw(head, st.st_size, name)
    elif check:
        info = _qemu_img(["info", "-U", "--output=json"], path, name, fmt)
        try:
            data_ = json.loads(info)
        except ValueError:
            raise InputError(f"{name}: qemu-img gave no readable description", hint=_CORRUPT_HINT) from None
        told = data_.get("backing-filename") if isinstance(data_, dict) else None
        if told and backing is None:
            # A format whose header we do not parse: qemu-img named the backing file without opening it.
            backing = reference(root, base, str(told), f"{name}'s backing file")
        if fmt in ("qcow2", "vmdk"):
            try:
                _qemu_img(["check", "-U"], path, name, fmt)
            except InputError as exc:
                cause = exc.__cause__
                if not (
                    isinstance(cause, CommandFailed) and cause.returncode == 3
                ):  # 3: leaked clusters only
                    raise
    return fmt, refs, backing


def _vmdk_refs(root: Path, base: str, path: Path, name: str, refs: list[ImageRef]) -> str | None:
    """Add a VMDK's extents to ``refs``; return its parent disk's name (for a delta disk)."""
    try:
        desc = read_vmdk_descriptor(path)
    except InputError as exc:
        raise InputError(f"{name} is not a readable vmdk image: {exc.message}", hint=_CORRUPT_HINT) from exc
    if not desc.embedded and not any(e.filename for e in desc.extents):
        raise InputError(f"{name} is a VMDK descriptor that names no extents", hint=_CORRUPT_HINT)
    for extent in desc.extents:
        if extent.filename and extent.kind != "ZERO":
            p = reference(root, base, extent.filename, f"{name}'s extent")
            if p.resolve() != path.resolve():  # a monolithic file names itself
                check_regular(p, f"{name}'s extent {extent.filename}")
                refs.append(ImageRef(p, "extent"))
    if desc.is_delta:
        if not desc.parent_hint:
            raise InputError(f"{name} is a delta disk without parentFileNameHint", hint=_CORRUPT_HINT)
        return desc.parent_hint
    return None


def _check_raw(head: bytes, size: int, name: str) -> None:
    """Refuse what cannot be a raw disk: a part of a sector, or plain text."""
    if size % 512:
        raise InputError(
            f"{name} is {size} bytes, not a whole number of 512-byte sectors: not a raw disk image",
            hint="give a disk image (qcow2, raw, vmdk); a truncated file cannot be shipped",
        )
    sample = head[:4096]
    if sample and b"\x00" not in sample:
        try:
            text = sample.decode("utf-8")
        except UnicodeDecodeError:
            return
        if sum(c.isprintable() or c in "\n\r\t" for c in text) >= 0.95 * len(text):
            raise InputError(
                f"{name} is a text file, not a disk image",
                hint="give a disk image (qcow2, raw, vmdk), not its description or a log",
            )


def declared_format(path: Path) -> str | None:
    """The format a file's suffix declares (``.qcow2``, ``.vmdk``, ...), or None."""
    return SUFFIX_FORMATS.get(path.suffix.lower())


def inspect_image_dir(directory: Path, *, check: bool = True) -> list[ImageRef]:
    """Every file a ``build-image`` directory (``boincvm-image.json``) will cause to be read, checked.

    Raises:
        PathEscapeError, InputError: as :func:`inspect_disk`, for the kernel, the initramfs,
            the disk and the descriptor itself.
    """
    descriptor = directory / DESCRIPTOR_NAME
    check_regular(descriptor, f"image descriptor {directory.name}/{DESCRIPTOR_NAME}")
    desc = ImageDescriptor.load(directory)
    out = [ImageRef(descriptor, "descriptor")]
    for role, member in (("kernel", desc.kernel), ("initrd", desc.initrd)):
        if member is not None:
            p = reference(directory, "", member, f"{DESCRIPTOR_NAME}.{role}")
            check_regular(p, f"{role} {directory.name}/{member}")
            out.append(ImageRef(p, role))
    if desc.disk is not None:
        p = reference(directory, "", desc.disk, f"{DESCRIPTOR_NAME}.disk")
        disk = inspect_disk(
            p, what=f"{directory.name}: disk {desc.disk}", declared=desc.disk_format, check=check
        )
        out += disk.files
    return out
