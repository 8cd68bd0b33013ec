"""Does an image have working guest tools? Static look-ups and, on request, a real boot.

Without guest tools the wrapper can neither copy files nor run the program, so this is
the check that matters most before an image ships to volunteers.
"""

from __future__ import annotations

import gzip
import json
import lzma
import tempfile
import time
from pathlib import Path

from boincvm import proc
from boincvm.errors import BoincvmError, InputError
from boincvm.findings import Finding, error, info, warning
from boincvm.image.descriptor import DESCRIPTOR_NAME, ImageDescriptor, ImageFormat

#: Where the guest tools live in the images we know of.
QEMU_GA_PATHS = ("usr/sbin/qemu-ga", "usr/bin/qemu-ga", "sbin/qemu-ga", "bin/qemu-ga")
VMTOOLS_PATHS = ("usr/bin/vmtoolsd", "usr/sbin/vmtoolsd", "usr/local/bin/vmtoolsd")


def cpio_names(data: bytes) -> list[str]:
    """Member names of a newc cpio archive (gzip or xz compressed, or plain).

    Raises:
        InputError: the data is not a newc archive.
    """
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    elif data[:6] == b"\xfd7zXZ\x00":
        data = lzma.decompress(data)
    names: list[str] = []
    pos = 0
    while pos + 110 <= len(data):
        if data[pos : pos + 6] not in (b"070701", b"070702"):
            raise InputError(f"not a newc cpio archive (bad magic at byte {pos})")
        filesize = int(data[pos + 54 : pos + 62], 16)
        namesize = int(data[pos + 94 : pos + 102], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1].decode(errors="replace")
        if name == "TRAILER!!!":
            break
        names.append(name.lstrip("./"))
        pos = (pos + 110 + namesize + 3) & ~3
        pos = (pos + filesize + 3) & ~3
    return names


def _static_initrd(initrd: Path, place: str) -> list[Finding]:
    try:
        names = set(cpio_names(initrd.read_bytes()))
    except (InputError, OSError, EOFError, lzma.LZMAError) as exc:
        return [
            warning(place, f"cannot list the initramfs ({exc})", "check with boot=True (validate --boot)")
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
    from boincvm.hypervisor.base import VmSpec
    from boincvm.hypervisor.qemu import QemuBackend
    from boincvm.image.descriptor import spec_for_image

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
    if image.is_dir():
        try:
            desc = ImageDescriptor.load(image)
        except InputError as exc:
            return [error(f"{image.name}/{DESCRIPTOR_NAME}", exc.message, exc.hint)]
        if desc.format is ImageFormat.KERNEL_INITRD and desc.initrd:
            findings += _static_initrd(image / desc.initrd, f"{image.name}/{desc.initrd}")
        elif desc.disk:
            findings += _static_disk(image / desc.disk, desc.disk_format, f"{image.name}/{desc.disk}")
    elif image.is_file():
        try:
            text = proc.run(["qemu-img", "info", "-U", "--output=json", image], timeout=60).text
            disk_format = str(json.loads(text)["format"])
        except BoincvmError as exc:
            return [error(image.name, exc.message, exc.hint)]
        findings += _static_disk(image, disk_format, image.name)
    else:
        return [error(str(image), "no such image file or directory")]
    if boot:
        findings += _boot(image, timeout, f"{image.name}.boot")
    return findings
