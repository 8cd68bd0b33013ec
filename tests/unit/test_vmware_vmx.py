""".vmx reading and writing, VMDK descriptors (separate and embedded in a monolithic sparse file), and the
static checks of VMware images built on them (Tools evidence, settings that break unattended runs)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from boincvm.errors import InputError
from boincvm.findings import Finding, Severity, has_errors
from boincvm.hypervisor.base import VmSpec
from boincvm.hypervisor.vmware.config import job_settings, wrapper_script
from boincvm.hypervisor.vmware.inspect import check_vmware
from boincvm.hypervisor.vmware.vmx import VmxFile, parse_vmdk_descriptor, read_vmdk_descriptor

VMX = """\
#!/usr/bin/vmware
.encoding = "UTF-8"
# a comment the user wrote
config.version = "8"
memsize = "1024"
MemSize = "2048"

ethernet0.present = "TRUE"
annotation = "line one|0Aline two"
unquoted = 42
"""

# VMware's "Virtual Disk Format 1.1" descriptor for a 2 GB split sparse disk, with the DDB
# keys Workstation writes when Tools have reported.
SPLIT_DESCRIPTOR = """\
# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=ffffffff
createType="twoGbMaxExtentSparse"

# Extent description
RW 4192256 SPARSE "disk-s001.vmdk"
RW 4192256 SPARSE "disk-s002.vmdk"
RW 2048 SPARSE "disk-s003.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.geometry.cylinders = "522"
ddb.virtualHWVersion = "19"
ddb.toolsInstallType = "4"
ddb.toolsVersion = "2147483647"
"""

DELTA_DESCRIPTOR = """\
# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=1b2c3d4e
parentCID=fffffffe
createType="monolithicSparse"
parentFileNameHint="disk.vmdk"
# Extent description
RW 8388608 SPARSE "disk-000001.vmdk"
"""


def sparse_vmdk(path: Path, descriptor: str, *, desc_offset: int = 1, desc_sectors: int = 20) -> None:
    """Write a monolithicSparse header (VMDK4 "KDMV") with ``descriptor`` embedded at ``desc_offset``."""
    header = struct.pack(
        "<IIIQQQQIQQQBccccH",
        0x564D444B,  # magic "KDMV"
        1,  # version
        3,  # flags: valid newline test, redundant grain table
        8388608,  # capacity (sectors)
        128,  # grain size (sectors)
        desc_offset,
        desc_sectors,
        512,  # numGTEsPerGT
        0,  # rgdOffset
        21,  # gdOffset
        128,  # overHead
        0,  # uncleanShutdown
        b"\n",
        b" ",
        b"\r",
        b"\n",
        0,  # compressAlgorithm
    )
    body = descriptor.encode().ljust(desc_sectors * 512, b"\0")
    path.write_bytes(header.ljust(desc_offset * 512, b"\0") + body + b"\0" * 4096)


def test_vmx_round_trip_keeps_everything() -> None:
    vmx = VmxFile.parse(VMX)
    assert vmx.render() == VMX
    assert vmx.get("memsize") == "2048"  # keys are case-insensitive; the last one wins
    assert vmx.get("UNQUOTED") == "42"
    assert vmx.flag("ethernet0.present") is True
    assert vmx.flag("memsize") is None


def test_vmx_edit_keeps_order_unknown_keys_and_spelling() -> None:
    vmx = VmxFile.parse(VMX).with_values({"memsize": "512", "ethernet0.present": None, "numvcpus": "2"})
    text = vmx.render()
    assert text.splitlines()[:4] == VMX.splitlines()[:4]
    assert 'memsize = "512"' in text and "MemSize" not in text  # duplicate collapsed into the first
    assert "ethernet0.present" not in text
    assert text.endswith('unquoted = 42\nnumvcpus = "2"\n')
    assert 'annotation = "line one|0Aline two"' in text
    assert VmxFile.parse(text).get("numvcpus") == "2"


@pytest.mark.parametrize("value", ['a"b', "a\nb", "a\rb"])
def test_vmx_refuses_values_that_could_inject_settings(value: str) -> None:
    with pytest.raises(InputError, match=r"vmx\.displayName"):
        VmxFile.parse(VMX).with_values({"displayName": value})


def test_vmx_save_and_load(tmp_path: Path) -> None:
    p = tmp_path / "x.vmx"
    VmxFile.parse(VMX).with_values({"a.b": "c"}).save(p)
    assert VmxFile.load(p).get("A.B") == "c"
    with pytest.raises(InputError, match="cannot read"):
        VmxFile.load(tmp_path / "missing.vmx")


def test_job_settings(tmp_path: Path) -> None:
    vmx = VmxFile.parse(VMX + 'ethernet2.present = "TRUE"\ncpuid.coresPerSocket = "2"\n')
    spec = VmSpec(name="t", workdir=tmp_path, memory_mb=1001, ncpus=4)
    s = job_settings(vmx, spec)
    assert s["memsize"] == "1004" and s["numvcpus"] == "4" and s["msg.autoAnswer"] == "TRUE"
    assert "cpuid.coresPerSocket" not in s  # 2 divides 4: kept
    assert s["ethernet0.present"] == s["ethernet2.present"] == s["ethernet0.startConnected"] == "FALSE"
    on = job_settings(vmx, VmSpec(name="t", workdir=tmp_path, enable_network=True, ncpus=3))
    assert on["ethernet0.present"] == "TRUE" and on["ethernet0.connectionType"] == "nat"
    assert on["ethernet2.present"] == "FALSE" and on["cpuid.coresPerSocket"] is None


def test_wrapper_script_quotes_everything() -> None:
    script = wrapper_script("/tmp/b/job-1", ["/bin/echo", "a b", "$(x)"], {"K": "v'w"}, "/d ir")
    assert "'/d ir'" in script and "'$(x)'" in script and "export K='v'\"'\"'w'" in script
    assert script.endswith("mv /tmp/b/job-1/rc.tmp /tmp/b/job-1/rc")
    with pytest.raises(InputError):
        wrapper_script("/tmp/j", ["x"], {"A-B": "1"}, None)


def test_separate_descriptor(tmp_path: Path) -> None:
    p = tmp_path / "disk.vmdk"
    p.write_text(SPLIT_DESCRIPTOR)
    d = read_vmdk_descriptor(p)
    assert d.create_type == "twoGbMaxExtentSparse" and not d.is_delta and not d.embedded
    assert [e.filename for e in d.extents] == ["disk-s001.vmdk", "disk-s002.vmdk", "disk-s003.vmdk"]
    assert d.extents[0].sectors == 4192256 and d.extents[0].kind == "SPARSE"
    assert d.ddb["ddb.toolsinstalltype"] == "4" and d.ddb["ddb.toolsversion"] == "2147483647"


def test_delta_descriptor() -> None:
    d = parse_vmdk_descriptor(DELTA_DESCRIPTOR)
    assert d.is_delta and d.parent_hint == "disk.vmdk"


def test_embedded_descriptor_of_monolithic_sparse(tmp_path: Path) -> None:
    p = tmp_path / "mono.vmdk"
    desc = SPLIT_DESCRIPTOR.replace("twoGbMaxExtentSparse", "monolithicSparse")
    sparse_vmdk(p, desc)
    d = read_vmdk_descriptor(p)
    assert d.embedded and d.create_type == "monolithicSparse" and d.ddb["ddb.toolsinstalltype"] == "4"
    other = tmp_path / "other-offset.vmdk"
    sparse_vmdk(other, desc, desc_offset=3, desc_sectors=2)
    assert read_vmdk_descriptor(other).ddb["ddb.adaptertype"] == "lsilogic"


def test_sparse_without_descriptor_and_garbage(tmp_path: Path) -> None:
    p = tmp_path / "nodesc.vmdk"
    sparse_vmdk(p, "", desc_offset=0, desc_sectors=0)
    with pytest.raises(InputError, match="without an embedded descriptor"):
        read_vmdk_descriptor(p)
    junk = tmp_path / "junk.vmdk"
    junk.write_bytes(b"\x00\x01" * 600)
    with pytest.raises(InputError):
        read_vmdk_descriptor(junk)
    text = tmp_path / "text.vmdk"
    text.write_text("hello\n")
    with pytest.raises(InputError, match="not a VMDK descriptor"):
        read_vmdk_descriptor(text)


# -- static checks -------------------------------------------------------------------------------

GOOD_VMX = """\
.encoding = "UTF-8"
memsize = "1024"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "disk.vmdk"
ide1:0.present = "TRUE"
ide1:0.deviceType = "cdrom-image"
ide1:0.fileName = "missing.iso"
ethernet0.present = "TRUE"
"""


def places(findings: list[Finding]) -> dict[str, str]:
    return {f.place: f.message for f in findings}


def test_good_vmx_with_tools_in_the_ddb(tmp_path: Path) -> None:
    sparse_vmdk(tmp_path / "disk.vmdk", SPLIT_DESCRIPTOR.replace("twoGbMaxExtentSparse", "monolithicSparse"))
    (tmp_path / "vm.vmx").write_text(GOOD_VMX)
    found = check_vmware(tmp_path / "vm.vmx")
    assert not has_errors(found), found
    by = places(found)
    assert "open-vm-tools" in by["vmx.scsi0:0.fileName.ddb.toolsInstallType"]
    assert "evidence of VMware Tools" in by["vmx"]
    assert "disconnects it" in by["vmx.ethernet0.present"]


def test_settings_that_break_unattended_runs(tmp_path: Path) -> None:
    (tmp_path / "vm.vmx").write_text(
        GOOD_VMX
        + 'encryption.keySafe = "vmware:key/list/(pair/(null/vmware-vmx))"\n'
        + 'isolation.tools.vixMessage.disable = "TRUE"\n'
        + 'guest_rpc.auth.disabled = "true"\n'
        + 'isolation.tools.setinfo.disable = "TRUE"\n'
        + 'scsi0:0.mode = "independent-persistent"\n'
        + 'memsize = "1023"\n'
    )
    found = check_vmware(tmp_path / "vm.vmx")
    by = places(found)
    errors = {f.place for f in found if f.severity is Severity.ERROR}
    assert errors >= {
        "vmx.encryption.keySafe",
        "vmx.isolation.tools.vixMessage.disable",
        "vmx.guest_rpc.auth.disabled",
        "vmx.scsi0:0.mode",
        "vmx.scsi0:0.fileName",  # disk.vmdk is missing
    }
    assert "does not exist" in by["vmx.scsi0:0.fileName"]
    assert "ide1:0" not in " ".join(by)  # CD-ROM images are not disks
    assert "multiple of 4" in by["vmx.memsize"]
    assert "no static evidence" in by["vmx"]
    assert str(next(f for f in found if f.place == "vmx.scsi0:0.mode")).startswith("vmx.scsi0:0.mode: ")


def test_separate_descriptor_extents_and_delta_chain(tmp_path: Path) -> None:
    (tmp_path / "disk.vmdk").write_text(SPLIT_DESCRIPTOR)
    (tmp_path / "disk-s001.vmdk").write_bytes(b"")
    found = places(check_vmware(tmp_path / "disk.vmdk"))
    assert "disk-s002.vmdk, disk-s003.vmdk do not exist" in found["vmdk.extent"]
    (tmp_path / "child.vmdk").write_text(DELTA_DESCRIPTOR.replace("disk.vmdk", "gone.vmdk"))
    child = places(check_vmware(tmp_path / "child.vmdk"))
    assert "gone.vmdk is missing" in child["vmdk.parentFileNameHint"]
    assert "no evidence of VMware Tools" in child["vmdk.ddb"]


def test_stream_optimized_and_unreadable(tmp_path: Path) -> None:
    sparse_vmdk(tmp_path / "s.vmdk", SPLIT_DESCRIPTOR.replace("twoGbMaxExtentSparse", "streamOptimized"))
    assert "cannot be run directly" in places(check_vmware(tmp_path / "s.vmdk"))["vmdk.createType"]
    assert has_errors(check_vmware(tmp_path / "missing.vmx"))
    (tmp_path / "x.qcow2").write_bytes(b"QFI\xfb")
    assert has_errors(check_vmware(tmp_path / "x.qcow2"))


def test_the_whole_parent_chain_is_checked(tmp_path: Path) -> None:
    from tests.fakes.vmware_vm import make_vm

    vmx = make_vm(tmp_path / "vm")
    assert not has_errors(check_vmware(vmx))
    (tmp_path / "vm/base-s002.vmdk").unlink()  # an extent of the delta's parent, not of a disk the .vmx names
    found = places(check_vmware(vmx))
    assert "base-s002.vmdk do not exist" in found["vmx.scsi0:0.fileName.parent.extent"], found
    child = places(check_vmware(tmp_path / "vm/base-000001.vmdk"))
    assert "base-s002.vmdk do not exist" in child["vmdk.parent.extent"]
    (tmp_path / "vm/loop.vmdk").write_text(DELTA_DESCRIPTOR.replace("disk.vmdk", "loop.vmdk"))
    assert "loops" in places(check_vmware(tmp_path / "vm/loop.vmdk"))["vmdk.parent.parentFileNameHint"]
