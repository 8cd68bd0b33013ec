"""The example app version's download: each file's bytes as stored and as the client downloads
them, and what of them the guest or the host uses where that can be told.

A file version.xml marks ``<gzip/>`` is served as ``NAME.gz`` (update_versions compresses it;
the client inflates it), counted here at gzip's default level 6; the others go as they are.
"""

from __future__ import annotations

import gzip
import struct
import tarfile
import tempfile
from pathlib import Path

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest, parse_version_xml
from boincvm.image.guest import build_guest_image

_PT_LOAD = 1


def _elf_loaded(data: bytes) -> int:
    """Bytes of an ELF file its loadable segments hold (what QEMU's PVH boot copies into RAM)."""
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    total = 0
    for i in range(phnum):
        p_type, _f, _off, _va, _pa, filesz, *_ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        total += filesz if p_type == _PT_LOAD else 0
    return total


def _cpio_files(data: bytes) -> tuple[int, int]:
    """(regular files, their bytes) in a newc cpio archive."""
    pos = count = total = 0
    while pos + 110 <= len(data):
        mode, size, namesize = (int(data[pos + o : pos + o + 8], 16) for o in (14, 54, 94))
        name_end = pos + 110 + namesize
        body = (name_end + 3) & ~3
        if data[pos + 110 : name_end - 1] == b"TRAILER!!!":
            break
        if mode & 0o170000 == 0o100000:
            count, total = count + 1, total + size
        pos = (body + size + 3) & ~3
    return count, total


def _tar_files(path: Path) -> tuple[int, int]:
    """(regular files, their bytes) in a tar archive."""
    with tarfile.open(path) as tar:
        sizes = [m.size for m in tar.getmembers() if m.isfile()]
    return len(sizes), sum(sizes)


def _use(name: str, data: bytes, path: Path) -> str:
    """What can be told of the bytes a file carries that are used."""
    if data[:4] == b"\x7fELF" and name == "vm_kernel":
        return f"{_elf_loaded(data) / 1e6:.2f} MB in loadable segments"
    if data[:6] == b"070701":
        n, size = _cpio_files(data)
        return f"{n} files, {size / 1e6:.2f} MB"
    if name.endswith(".tar.xz"):
        n, size = _tar_files(path)
        return f"{n} files, {size / 1e6:.2f} MB unpacked"
    return ""


def report(av: Path) -> tuple[int, int]:
    """Print one line per file of the app version in ``av``; return (stored, downloaded) bytes."""
    vx, _ = parse_version_xml((av / "version.xml").read_bytes())
    stored = sent_total = 0
    print(f"  {'file':26} {'stored':>12} {'downloaded':>12}")
    for f in vx.files:
        path = av / f.physical_name
        data = path.read_bytes()
        sent = len(gzip.compress(data, 6)) if f.gzip else len(data)
        stored, sent_total = stored + len(data), sent_total + sent
        name = f.logical_name or ("main program" if f.main_program else f.physical_name.rpartition("_")[2])
        mark = "gzip" if f.gzip else "    "
        print(f"  {name:26} {len(data):12,} {sent:12,} {mark}  {_use(name, data, path)}")
    print(f"  {'total':26} {stored:12,} {sent_total:12,}")
    return stored, sent_total


def main() -> None:
    """Package the example guest with the default (frozen) wrapper and print the figures."""
    print("== the example app version as the client downloads it (minimal guest, frozen wrapper)")
    guest = build_guest_image("minimal")
    with tempfile.TemporaryDirectory() as d:
        av = Path(d) / "av"
        package_image(AppVersionRequest(image=guest, app_name="hello", output_dir=av, version="1.00"))
        _, sent = report(av)
        print(f"  downloaded in all: {sent / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
