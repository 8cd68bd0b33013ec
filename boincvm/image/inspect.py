"""Does an image have working guest tools? Static look-ups and, on request, a real boot.

Without guest tools the wrapper can neither copy files nor run the program, so this is
the check that matters most before an image ships to volunteers.
"""

from __future__ import annotations

import gzip
import lzma
import tempfile
import time
import zlib
from pathlib import Path
from typing import BinaryIO, cast

from boincvm import proc
from boincvm.errors import BoincvmError, InputError
from boincvm.findings import Finding, error, info, warning
from boincvm.hypervisor.base import VmSpec
from boincvm.hypervisor.qemu.backend import QemuBackend
from boincvm.image.descriptor import ImageDescriptor, ImageFormat, spec_for_image
from boincvm.image.elf import looks_like_kernel as kernel
from boincvm.image.refs import declared_format, inspect_disk, inspect_image_dir
from boincvm.paths import check_regular, open_regular

#: Where the guest tools live in the images we know of.
QEMU_GA_PATHS = ("usr/sbin/qemu-ga", "usr/bin/qemu-ga", "sbin/qemu-ga", "bin/qemu-ga")
VMTOOLS_PATHS = ("usr/bin/vmtoolsd", "usr/sbin/vmtoolsd", "usr/local/bin/vmtoolsd")


#: An initramfs is read as a stream and given up on past this many (uncompressed) bytes:
#: a few MB of gzip can inflate to many GB (a "gzip bomb").
CPIO_MAX_BYTES = 1 << 30
_CHUNK = 1 << 20


class _Inflated:
    """A bounded, streaming reader of a plain, gzip or xz file (never the whole of it in memory)."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        head = raw.read(6)
        raw.seek(0)
        self._stream: BinaryIO
        if head[:2] == b"\x1f\x8b":
            self._stream = cast(BinaryIO, gzip.GzipFile(fileobj=raw))
        elif head == b"\xfd7zXZ\x00":
            self._stream = cast(BinaryIO, lzma.LZMAFile(raw))
        else:
            self._stream = raw
        self.pos = 0
        self._limit = limit

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer at the end of the stream."""
        if self.pos + n > self._limit:
            raise InputError(
                f"the initramfs inflates to more than {self._limit >> 20} MiB: "
                "it is corrupt or a decompression bomb",
                hint="build the initramfs again (boincvm build-image) and check what went into it",
            )
        out = b""
        while len(out) < n and (block := self._stream.read(min(n - len(out), _CHUNK))):
            out += block
        self.pos += len(out)
        return out

    def skip(self, n: int) -> None:
        """Skip ``n`` bytes (in bounded chunks)."""
        while n > 0:
            step = min(n, _CHUNK)
            if len(self.read(step)) < step:
                return
            n -= step


def cpio_names(raw: BinaryIO, *, limit: int | None = None) -> list[str]:
    """Member names of a newc cpio archive (gzip or xz compressed, or plain), read as a stream.

    Raises:
        InputError: the data is not a newc archive, is cut off, or inflates past ``limit``
            bytes (default :data:`CPIO_MAX_BYTES`).
        OSError, EOFError, lzma.LZMAError, zlib.error: the compressed stream is corrupt.
    """
    data = _Inflated(raw, CPIO_MAX_BYTES if limit is None else limit)
    names: list[str] = []
    while True:
        at = data.pos
        header = data.read(110)
        if not header:
            break  # no trailer: the kernel accepts that
        if len(header) < 110 or header[:6] not in (b"070701", b"070702"):
            raise InputError(f"not a newc cpio archive (bad header at byte {at})")
        try:
            filesize = int(header[54:62], 16)
            namesize = int(header[94:102], 16)
        except ValueError:
            raise InputError(f"not a newc cpio archive (bad header at byte {at})") from None
        if not 1 <= namesize <= 4096:
            raise InputError(f"not a newc cpio archive (a name of {namesize} bytes at byte {at})")
        raw_name = data.read(namesize)
        if len(raw_name) < namesize:
            raise InputError(f"the cpio archive is cut off in the header at byte {at}")
        name = raw_name[:-1].decode(errors="replace")
        data.skip(-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            break
        names.append(name.lstrip("./"))
        data.skip(filesize + (-filesize % 4))
    return names


def _static_initrd(initrd: Path, place: str) -> list[Finding]:
    try:
        with open_regular(initrd, f"initramfs {initrd.name}") as f:
            names = set(cpio_names(f))
    except InputError as exc:
        hint = exc.hint or "build the initramfs again; the kernel cannot unpack it either"
        return [error(place, f"the initramfs is unreadable: {exc.message}", hint)]
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        return [
            error(
                place,
                f"the initramfs is unreadable: its compressed stream is corrupt ({exc})",
                "build the initramfs again; the kernel cannot unpack it either",
            )
        ]
    found = [p for p in QEMU_GA_PATHS if p in names]
    if not found:
        return [error(place, "the initramfs has no qemu-ga", "add qemu-guest-agent and start it from /init")]
    out = [info(place, f"qemu-ga found at /{found[0]}")]
    if not any(n.endswith("virtio_console.ko") for n in names):
        out.append(warning(place, "no virtio_console module in the initramfs (fine only if it is built in)"))
    return out


def _static_disk(disk: Path, fmt: str, place: str) -> list[Finding]:
    virt_ls = proc.which("virt-ls")
    if virt_ls is not None:
        present: set[str] = set()
        for d in sorted({p.rsplit("/", 1)[0] for p in QEMU_GA_PATHS + VMTOOLS_PATHS}):
            done = proc.run([virt_ls, "--format", fmt, "-a", disk, "/" + d], timeout=300, check=False)
            present |= {f"{d}/{n}" for n in done.text.split()}
        return _verdict(present, place)
    debugfs = proc.which("debugfs") or (Path("/sbin/debugfs") if Path("/sbin/debugfs").exists() else None)
    if fmt == "raw" and debugfs is not None:
        # Works when the raw disk is one unpartitioned ext file system (like our scratch disks).
        present = set()
        for p in QEMU_GA_PATHS + VMTOOLS_PATHS:
            done = proc.run([debugfs, "-R", f"stat /{p}", disk], timeout=60, check=False)
            if done.returncode == 0 and b"Inode:" in done.stdout:
                present.add(p)
        return _verdict(present, place)
    return [
        warning(
            place,
            f"guest tools not verified: cannot look inside a {fmt} disk without libguestfs (virt-ls)",
            "boot it: boincvm validate --boot IMAGE",
        )
    ]


def _verdict(present: set[str], place: str) -> list[Finding]:
    ga = [p for p in QEMU_GA_PATHS if p in present]
    vmt = [p for p in VMTOOLS_PATHS if p in present]
    out: list[Finding] = []
    if ga:
        out.append(info(place, f"qemu-ga found at /{ga[0]}"))
    if vmt:
        out.append(info(place, f"VMware tools found at /{vmt[0]}"))
    if not out:
        hint = "install qemu-guest-agent (QEMU) or open-vm-tools (VMware) and enable it at boot"
        out.append(error(place, "no qemu-ga or vmtoolsd found in the image", hint))
    return out


def _boot(image: Path, timeout: float, place: str) -> list[Finding]:
    with tempfile.TemporaryDirectory(prefix="boincvm-inspect-") as tmp:
        workdir = Path(tmp)
        if image.is_dir():
            spec = spec_for_image(image, name="inspect", workdir=workdir, boot_timeout=timeout)
        else:
            spec = VmSpec(name="inspect", workdir=workdir, image=image, boot_timeout=timeout)
        try:
            with QemuBackend(spec) as vm:
                t0 = time.monotonic()
                vm.power_on()
                vm.wait_for_tools()
                took = time.monotonic() - t0
                status = vm.run_program(["/bin/sh", "-c", "echo ok"], timeout=30)
                accel = vm.accel.accel if vm.accel else "qemu"
                out = [info(place, f"qemu-ga answered {took:.1f} s after power-on ({accel})")]
                if not status.succeeded or status.stdout_tail.strip() != b"ok":
                    out.append(error(place, "the agent answers but cannot run /bin/sh in the guest"))
                return out
        except BoincvmError as exc:
            return [error(place, exc.message, exc.hint)]


def check_guest_tools(image: Path, *, boot: bool = False, timeout: float = 60.0) -> list[Finding]:
    """Findings about an image's guest tools.

    ``image`` is an image directory with ``boincvm-image.json`` or a disk file (qcow2, raw,
    vmdk). Statically the initramfs (or, with libguestfs or debugfs, the disk) is searched
    for qemu-ga / vmtoolsd; with ``boot`` the image is started under QEMU and the agent
    must answer within ``timeout`` seconds and run a command. Problems come back as
    findings, never as exceptions.
    """
    findings: list[Finding] = []
    # First the whole reference chain: nothing (not qemu-img, not a guest) reads a file
    # before it is known to be a regular file inside the image's own directory.
    try:
        if image.is_dir() and not image.is_symlink():
            inspect_image_dir(image)
        elif image.name.lower().endswith(_INITRD_SUFFIXES):
            check_regular(image, image.name)
            return _static_initrd(image, image.name)
        elif looks_like_kernel(image):
            check_regular(image, image.name)
            return [info(image.name, "a kernel: give its image directory to check the guest tools")]
        else:
            disk = inspect_disk(image, what=image.name, declared=declared_format(image))
    except BoincvmError as exc:
        return [error(image.name, exc.message, exc.hint)]
    if image.is_dir():
        desc = ImageDescriptor.load(image)
        if desc.format is ImageFormat.KERNEL_INITRD and desc.initrd:
            findings += _static_initrd(image / desc.initrd, f"{image.name}/{desc.initrd}")
        elif desc.disk:
            findings += _static_disk(image / desc.disk, desc.disk_format, f"{image.name}/{desc.disk}")
    else:
        findings += _static_disk(image, disk.format, image.name)
    if boot:
        findings += _boot(image, timeout, f"{image.name}.boot")
    return findings


_INITRD_SUFFIXES = (".cpio", ".cpio.gz", ".cpio.xz")


def looks_like_kernel(path: Path) -> bool:
    """A Linux kernel (see :func:`boincvm.image.elf.looks_like_kernel`)."""
    return path.suffix == "" and kernel(path)
