"""VMware VM directories for tests, written from VMware's documented file formats.

:func:`make_vm` writes what Workstation leaves after "power off, take snapshot boincvm-base"
on a VM with two disks:

* ``base.vmx`` naming the current disks (the deltas made by the snapshot), the nvram and
  the .vmxf;
* ``base.vmdk``: a ``twoGbMaxExtentSparse`` descriptor with two extents (sparse extents with a
  ``KDMV`` header and no embedded descriptor), the first 2 MiB, the second small;
* ``base-000001.vmdk``: its delta, a ``monolithicSparse`` file whose embedded descriptor has
  ``parentCID`` and ``parentFileNameHint="base.vmdk"``;
* ``data.vmdk`` (``monolithicSparse``, embedded descriptor, 2 MiB) and its delta
  ``data-000001.vmdk``;
* ``base.vmsd`` with ``snapshot0.displayName = "boincvm-base"``, its ``.vmsn`` and disks;
* ``base.nvram``, ``base.vmxf`` and a ``vmware.log`` (which is not part of the VM).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

SECTOR = 512
MIB = 1 << 20


def sparse_header(capacity_sectors: int, desc_offset: int, desc_sectors: int) -> bytes:
    """A VMDK4 sparse extent header (Virtual Disk Format 1.1): magic, version, flags, capacity,
    grain size, descriptor offset and size, GTEs per GT, rgd/gd offsets, overhead, clean flag,
    and the four line-end check characters."""
    head = struct.pack(
        "<IIIQQQQIQQQB4s",
        0x564D444B,  # "KDMV"
        1,
        3,
        capacity_sectors,
        128,
        desc_offset,
        desc_sectors,
        512,
        0,
        0,
        128,
        0,
        b"\n \r\n",
    )
    return head.ljust(SECTOR, b"\0")


def write_sparse(path: Path, descriptor: str | None, size: int, seed: str) -> None:
    """A sparse extent of ``size`` bytes: header, optional embedded descriptor at sector 1, some data."""
    desc_sectors = 20 if descriptor is not None else 0
    with path.open("wb") as f:
        f.write(sparse_header(8 * MIB // SECTOR, 1 if descriptor else 0, desc_sectors))
        if descriptor is not None:
            f.write(descriptor.encode().ljust(desc_sectors * SECTOR, b"\0"))
        f.seek(64 * 1024)
        f.write(hashlib.sha256(seed.encode()).digest() * 128)  # 4 KiB of data, the rest holes
        f.truncate(size)


def descriptor(create_type: str, extents: list[str], *, parent: str | None = None) -> str:
    lines = ["# Disk DescriptorFile", "version=1", 'encoding="UTF-8"', "CID=7e5b3c21"]
    lines.append("parentCID=3a1f9d07" if parent else "parentCID=ffffffff")
    if parent:
        lines.append(f'parentFileNameHint="{parent}"')
    lines += [f'createType="{create_type}"', "", "# Extent description"]
    lines += [f'RW {8 * MIB // SECTOR} SPARSE "{e}"' for e in extents]
    lines += [
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        'ddb.virtualHWVersion = "19"',
        'ddb.adapterType = "lsilogic"',
    ]
    if not parent:
        lines += ['ddb.toolsInstallType = "4"', 'ddb.toolsVersion = "2147483647"']
    return "\n".join(lines) + "\n"


def make_vm(directory: Path, name: str = "base", *, snapshot: str | None = "boincvm-base") -> Path:
    """Write the VM described in the module docstring into ``directory``; return its .vmx."""
    directory.mkdir(parents=True, exist_ok=True)
    d = directory
    (d / f"{name}.vmx").write_text(
        "\n".join(
            [
                '.encoding = "UTF-8"',
                'config.version = "8"',
                'virtualHW.version = "19"',
                f'displayName = "{name}"',
                'guestOS = "debian11-64"',
                'memsize = "768"',
                'numvcpus = "2"',
                f'nvram = "{name}.nvram"',
                f'extendedConfigFile = "{name}.vmxf"',
                'scsi0.present = "TRUE"',
                'scsi0.virtualDev = "lsilogic"',
                'scsi0:0.present = "TRUE"',
                f'scsi0:0.fileName = "{name}-000001.vmdk"',
                'scsi0:1.present = "TRUE"',
                'scsi0:1.fileName = "data-000001.vmdk"',
                'ide1:0.present = "TRUE"',
                'ide1:0.deviceType = "cdrom-image"',
                'ide1:0.fileName = "/isos/debian.iso"',
                'ethernet0.present = "TRUE"',
                'tools.remindInstall = "FALSE"',
                "",
            ]
        )
    )
    (d / f"{name}.vmdk").write_text(
        descriptor("twoGbMaxExtentSparse", [f"{name}-s001.vmdk", f"{name}-s002.vmdk"])
    )
    write_sparse(d / f"{name}-s001.vmdk", None, 2 * MIB, f"{name}-s001")
    write_sparse(d / f"{name}-s002.vmdk", None, 64 * 1024, f"{name}-s002")
    write_sparse(
        d / f"{name}-000001.vmdk",
        descriptor("monolithicSparse", [f"{name}-000001.vmdk"], parent=f"{name}.vmdk"),
        96 * 1024,
        "delta0",
    )
    write_sparse(d / "data.vmdk", descriptor("monolithicSparse", ["data.vmdk"]), 2 * MIB, "data")
    write_sparse(
        d / "data-000001.vmdk",
        descriptor("monolithicSparse", ["data-000001.vmdk"], parent="data.vmdk"),
        96 * 1024,
        "delta1",
    )
    (d / f"{name}.nvram").write_bytes(b"NVRAM\0" + bytes(range(256)) * 32)
    (d / f"{name}.vmxf").write_text(
        '<?xml version="1.0"?>\n<Foundry><VM><VMId type="string">52 1a</VMId></VM></Foundry>\n'
    )
    (d / "vmware.log").write_text("2024-01-01T00:00:00.000Z In(05) vmx Log for VMware Workstation\n")
    if snapshot is not None:
        (d / f"{name}-Snapshot1.vmsn").write_bytes(b"\xd2\xbe\xd2\xbe" + b"snapshot config" * 64)
        write_vmsd(d / f"{name}.vmsd", [(snapshot, f"{name}-Snapshot1.vmsn", [f"{name}.vmdk", "data.vmdk"])])
    return d / f"{name}.vmx"


def write_vmsd(path: Path, snapshots: list[tuple[str, str, list[str]]]) -> None:
    """A .vmsd as Workstation writes it: one ``snapshotN.*`` block per snapshot."""
    lines = [
        '.encoding = "UTF-8"',
        f'snapshot.lastUID = "{len(snapshots)}"',
        f'snapshot.current = "{len(snapshots)}"',
    ]
    for i, (name, vmsn, disks) in enumerate(snapshots):
        lines += [
            f'snapshot{i}.uid = "{i + 1}"',
            f'snapshot{i}.filename = "{vmsn}"',
            f'snapshot{i}.displayName = "{name}"',
            f'snapshot{i}.createTimeHigh = "398766"',
            f'snapshot{i}.createTimeLow = "-1208359424"',
            f'snapshot{i}.numDisks = "{len(disks)}"',
        ]
        if i:
            lines.append(f'snapshot{i}.parent = "{i}"')
        for j, disk in enumerate(disks):
            lines += [f'snapshot{i}.disk{j}.fileName = "{disk}"', f'snapshot{i}.disk{j}.node = "scsi0:{j}"']
    lines.append(f'snapshot.numSnapshots = "{len(snapshots)}"')
    path.write_text("\n".join(lines) + "\n")


#: What make_vm's VM consists of (vmware.log is not part of it).
VM_FILES = {
    "base.vmx": "vmx",
    "base-000001.vmdk": "disk",
    "base.vmdk": "disk",
    "base-s001.vmdk": "extent",
    "base-s002.vmdk": "extent",
    "data-000001.vmdk": "disk",
    "data.vmdk": "disk",
    "base.nvram": "nvram",
    "base.vmxf": "vmxf",
    "base.vmsd": "vmsd",
    "base-Snapshot1.vmsn": "snapshot-state",
}
