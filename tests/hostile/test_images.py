"""Hostile images: reference chains that leave the image's directory, links, FIFOs, non-images, bombs.

Every image is built here by code (``qemu-img create``, descriptor text, a few header bytes).
The host file the attacks point at is ``sandbox.secret``; a refusal leaves the sandbox tree
exactly as it was, so no byte of it can have reached an app version. ``package-image`` must
refuse (exit 3) before reading anything; ``validate`` must call each image invalid (exit 4,
an error finding in ``--json`` naming the problem) and change nothing either.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakes.vmware_vm import make_vm
from tests.hostile.harness import Outcome, Sandbox, assert_clean_refusal

MIB = 1 << 20
Build = Callable[[Sandbox], str]


def qemu_img(*args: str, cwd: Path) -> None:
    subprocess.run(["qemu-img", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def qcow2_backed_by(name: str, backing: str) -> Build:
    """A qcow2 in ``work`` whose backing file is ``backing`` (written as given, never opened: -u)."""

    def build(sb: Sandbox) -> str:
        backing_name = backing.replace("SECRET", str(sb.secret))
        qemu_img(
            "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing_name, name, "1M", cwd=sb.work
        )
        return name

    return build


def qcow2_with_data_file(data_file: str) -> Build:
    """A qcow2 whose external data file is ``data_file`` (relative to ``work``, or absolute)."""

    def build(sb: Sandbox) -> str:
        target = sb.work / data_file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes(MIB))
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data_file}", "d.qcow2", "1M", cwd=sb.work)
        return "d.qcow2"

    return build


def linked_data_file(sb: Sandbox) -> str:
    """A qcow2 with the data file ``d.raw`` beside it, then ``d.raw`` swapped for a link to the secret."""
    qcow2_with_data_file("d.raw")(sb)
    (sb.work / "d.raw").unlink()
    (sb.work / "d.raw").symlink_to(sb.secret)
    return "d.qcow2"


def linked_backing(sb: Sandbox) -> str:
    """A qcow2 backed by ``base.raw`` beside it, a link to the secret."""
    (sb.work / "base.raw").symlink_to(sb.secret)
    return qcow2_backed_by("x.qcow2", "base.raw")(sb)


def second_level_escape(sb: Sandbox) -> str:
    """top.qcow2 -> base.qcow2 (inside, fine) -> the secret (absolute)."""
    qcow2_backed_by("base.qcow2", "SECRET")(sb)
    qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "base.qcow2", "top.qcow2", "1M", cwd=sb.work
    )
    return "top.qcow2"


def flat_vmdk(extent: str, name: str = "x.vmdk") -> Build:
    """A monolithicFlat VMDK descriptor with one extent named ``extent`` (SECRET: the secret's path)."""

    def build(sb: Sandbox) -> str:
        target = extent.replace("SECRET", str(sb.secret))
        (sb.work / name).write_text(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
            f'createType="monolithicFlat"\nRW 2048 FLAT "{target}" 0\n'
        )
        return name

    return build


def linked_flat_extent(sb: Sandbox) -> str:
    (sb.work / "x-flat.vmdk").symlink_to(sb.secret)
    return flat_vmdk("x-flat.vmdk")(sb)


def vmdk_without_extents(sb: Sandbox) -> str:
    (sb.work / "x.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
    )
    return "x.vmdk"


def fifo(name: str) -> Build:
    def build(sb: Sandbox) -> str:
        os.mkfifo(sb.work / name)
        return name

    return build


def link_to_secret(name: str) -> Build:
    def build(sb: Sandbox) -> str:
        (sb.work / name).symlink_to(sb.secret)
        return name

    return build


def file_of(name: str, data: bytes) -> Build:
    def build(sb: Sandbox) -> str:
        (sb.work / name).write_bytes(data)
        return name

    return build


def truncated_qcow2(sb: Sandbox) -> str:
    qemu_img("create", "-q", "-f", "qcow2", "t.qcow2", "64M", cwd=sb.work)
    with (sb.work / "t.qcow2").open("r+b") as f:
        f.truncate(512)
    return "t.qcow2"


TEXT = b"This is not a disk image, only a README someone renamed.\n" * 40000  # > 2 MiB


def image_dir(
    sb: Sandbox, *, kernel: str = "vmlinux", initrd: str = "initramfs.cpio", disk: str | None = None
) -> Path:
    """A ``build-image`` directory ``img`` with a regular kernel and initramfs unless replaced."""
    d = sb.work / "img"
    d.mkdir(exist_ok=True)
    for member, data in ((kernel, b"\x7fELF" + bytes(4092)), (initrd, cpio([]))):
        if not (d / member).exists() and not (d / member).is_symlink():
            (d / member).write_bytes(data)
    desc = {"schema": 1, "format": "kernel+initrd", "kernel": kernel, "initrd": initrd}
    if disk:
        desc |= {"disk": disk, "disk_format": "qcow2"}
    (d / "boincvm-image.json").write_text(json.dumps(desc))
    return d


def dir_with_link(member: str) -> Build:
    def build(sb: Sandbox) -> str:
        (sb.work / "img").mkdir()
        (sb.work / "img" / member).symlink_to(sb.secret)
        image_dir(sb, disk="scratch.qcow2" if member == "scratch.qcow2" else None)
        return "img"

    return build


def dir_disk_escaping(sb: Sandbox) -> str:
    (sb.work / "img").mkdir()
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        str(sb.secret),
        "img/scratch.qcow2",
        "1M",
        cwd=sb.work,
    )
    image_dir(sb, disk="scratch.qcow2")
    return "img"


def vm_with_link(member: str) -> Build:
    """A VMware VM directory (tests.fakes.vmware_vm) whose ``member`` is a link to the secret."""

    def build(sb: Sandbox) -> str:
        make_vm(sb.work / "vm")
        (sb.work / "vm" / member).unlink()
        (sb.work / "vm" / member).symlink_to(sb.secret)
        return "vm"

    return build


def vm_disk_at(reference: str) -> Build:
    """A VMware VM whose second disk is named ``reference`` (SECRET: an absolute path)."""

    def build(sb: Sandbox) -> str:
        vmx = make_vm(sb.work / "vm")
        (sb.canary / "x.vmdk").write_text(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
            'createType="monolithicFlat"\nRW 2048 FLAT "secret" 0\n'
        )
        ref = reference.replace("SECRET", str(sb.canary / "x.vmdk"))
        vmx.write_text(vmx.read_text().replace('"data-000001.vmdk"', f'"{ref}"'))
        return "vm"

    return build


#: (id, build, the sentence package-image must refuse with)
PACKAGE_REFUSALS: list[tuple[str, Build, str]] = [
    ("vmdk-extent-up", flat_vmdk("../canary/secret"), r"extent names '\.\./canary/secret', which leaves"),
    ("vmdk-extent-deep-up", flat_vmdk("../../../../../../etc/passwd"), r"which leaves the image's directory"),
    ("vmdk-extent-absolute", flat_vmdk("SECRET"), r"extent names '.*secret', an absolute path"),
    ("vmdk-extent-link", linked_flat_extent, r"x-flat\.vmdk.*symbolic link"),
    ("vmdk-no-extents", vmdk_without_extents, r"x\.vmdk is a VMDK descriptor that names no extents"),
    (
        "qcow2-backing-absolute",
        qcow2_backed_by("x.qcow2", "SECRET"),
        r"backing file names '.*secret', an absolute",
    ),
    (
        "qcow2-backing-up",
        qcow2_backed_by("x.qcow2", "../canary/secret"),
        r"backing file names .* which leaves",
    ),
    (
        "qcow2-backing-json",
        qcow2_backed_by("x.qcow2", 'json:{"driver":"file","filename":"SECRET"}'),
        r"JSON filename",
    ),
    (
        "qcow2-backing-nbd",
        qcow2_backed_by("x.qcow2", "nbd:localhost:10809"),
        r"'nbd:localhost:10809', a protocol",
    ),
    (
        "qcow2-backing-file-prefix",
        qcow2_backed_by("x.qcow2", "file:base.raw"),
        r"'file:base\.raw', a protocol",
    ),
    ("qcow2-backing-link", linked_backing, r"base\.raw.*symbolic link"),
    (
        "qcow2-backing-second-level",
        second_level_escape,
        r"backing file base\.qcow2's backing file names .*absolute",
    ),
    (
        "qcow2-data-file-up",
        qcow2_with_data_file("../canary/d.raw"),
        r"data-file names '\.\./canary/d\.raw'.*leaves",
    ),
    ("qcow2-data-file-link", linked_data_file, r"d\.raw.*symbolic link"),
    ("image-is-link", link_to_secret("x.img"), r"x\.img is a symbolic link \(to '.*canary/secret'\)"),
    ("fifo-qcow2", fifo("x.qcow2"), r"x\.qcow2 is a FIFO, not a regular file"),
    ("fifo-raw", fifo("x.img"), r"x\.img is a FIFO, not a regular file"),
    ("fifo-vmdk", fifo("x.vmdk"), r"x\.vmdk is a FIFO, not a regular file"),
    ("fifo-no-suffix", fifo("vmlinuz"), r"vmlinuz is a FIFO, not a regular file"),
    ("text-as-qcow2", file_of("x.qcow2", TEXT), r"x\.qcow2 is not a qcow2 image \(its header shows raw\)"),
    ("text-as-raw", file_of("x.img", (TEXT * 2)[: 4 * MIB]), r"x\.img is a text file"),
    ("text-as-vmdk", file_of("x.vmdk", TEXT), r"x\.vmdk is not a vmdk image"),
    (
        "qcow2-magic-then-zeros",
        file_of("z.qcow2", b"QFI\xfb" + bytes(508)),
        r"z\.qcow2 is not a readable qcow2 image",
    ),
    (
        "qcow2-magic-in-img",
        file_of("z.img", b"QFI\xfb\0\0\0\3" + bytes(range(256)) * 2),
        r"is not a readable qcow2",
    ),
    ("qcow2-truncated", truncated_qcow2, r"t\.qcow2 is not a readable qcow2 image"),
    ("raw-part-sector", file_of("x.raw", bytes(MIB + 1)), r"not a whole number of 512-byte sectors"),
    ("dir-initrd-link", dir_with_link("initramfs.cpio"), r"initrd.*initramfs\.cpio.*symbolic link"),
    ("dir-kernel-link", dir_with_link("vmlinux"), r"kernel.*vmlinux.*symbolic link"),
    ("dir-disk-link", dir_with_link("scratch.qcow2"), r"disk.*scratch\.qcow2.*symbolic link"),
    ("dir-disk-backing-host", dir_disk_escaping, r"disk scratch\.qcow2's backing file names .*absolute"),
    ("vm-flat-extent-link", vm_with_link("base-s001.vmdk"), r"base-s001\.vmdk.*symbolic link"),
    ("vm-nvram-link", vm_with_link("base.nvram"), r"base\.nvram.*symbolic link"),
    ("vm-vmx-link", vm_with_link("base.vmx"), r"base\.vmx is a symbolic link"),
    ("vm-disk-outside", vm_disk_at("../canary/x.vmdk"), r"leaves the VM directory"),
    ("vm-disk-absolute", vm_disk_at("SECRET"), r"is an absolute path"),
]


@pytest.mark.parametrize(
    ("build", "sentence"), [c[1:] for c in PACKAGE_REFUSALS], ids=[c[0] for c in PACKAGE_REFUSALS]
)
def test_package_image_refuses(sandbox: Sandbox, build: Build, sentence: str) -> None:
    image = build(sandbox)
    outcome = sandbox.run(["package-image", image, "--app", "x", "-o", "out", "--no-gzip"])
    sandbox.assert_refused(outcome, 3, sentence)


def test_package_image_refuses_an_absolute_data_file(sandbox: Sandbox) -> None:
    elsewhere = sandbox.canary / "d.raw"
    image = qcow2_with_data_file(str(elsewhere))(sandbox)
    outcome = sandbox.run(["package-image", image, "--app", "x", "-o", "out"])
    sandbox.assert_refused(outcome, 3, r"data-file names '/.*canary/d\.raw', an absolute path")


# -- output directories that overlap the input ----------------------------------------------------


def _qcow2_in(sb: Sandbox, directory: str) -> str:
    (sb.work / directory).mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", f"{directory}/x.qcow2", "4M", cwd=sb.work)
    return f"{directory}/x.qcow2"


OVERLAPS: list[tuple[str, Callable[[Sandbox], list[str]], str]] = [
    ("dir-into-itself", lambda sb: [image_dir(sb).name, "-o", "img"], r"--output-dir img is the input img"),
    (
        "inside-image-dir",
        lambda sb: [image_dir(sb).name, "-o", "img/out"],
        r"img/out lies inside the input img",
    ),
    (
        "contains-disk",
        lambda sb: [_qcow2_in(sb, "d"), "-o", "d"],
        r"--output-dir d holds the input d/x\.qcow2",
    ),
    (
        "vm-into-itself",
        lambda sb: [make_vm(sb.work / "vm").parent.name, "-o", "vm"],
        r"--output-dir vm is the input",
    ),
    (
        "inside-vm-dir",
        lambda sb: [make_vm(sb.work / "vm").parent.name, "-o", "vm/av"],
        r"vm/av lies inside the input",
    ),
]


@pytest.mark.parametrize(("args", "sentence"), [c[1:] for c in OVERLAPS], ids=[c[0] for c in OVERLAPS])
def test_package_image_output_may_not_overlap_the_input(
    sandbox: Sandbox, args: Callable[[Sandbox], list[str]], sentence: str
) -> None:
    argv = args(sandbox)
    outcome = sandbox.run(["package-image", *argv, "--app", "x", "--force"])
    sandbox.assert_refused(outcome, 3, sentence)
    assert "choose another output directory" in outcome.err


# -- validate: the check admins run before shipping must be the strictest ---------------------------


def validate(sb: Sandbox, path: str, *extra: str) -> tuple[Outcome, list[dict[str, str]]]:
    """Run ``validate --json PATH``; return the outcome and the error findings of its report."""
    outcome = sb.run(["validate", "--json", *extra, path])
    reports = json.loads(outcome.out)
    return outcome, [f for r in reports for f in r["findings"] if f["severity"] == "error"]


def assert_invalid(sb: Sandbox, outcome: Outcome, errors: list[dict[str, str]], sentence: str) -> None:
    """Exit 4 with a finding whose message matches, a hint, no traceback, the tree unchanged."""
    import re

    assert_clean_refusal(outcome, 4, "failed validation")
    assert any(re.search(sentence, f["message"], re.IGNORECASE) for f in errors), f"{errors}\n{outcome}"
    assert all(f["hint"] for f in errors if re.search(sentence, f["message"], re.IGNORECASE)), errors
    assert not sb.changes(), sb.changes()


def cpio(members: list[tuple[str, int]]) -> bytes:
    """A newc archive of empty-bodied members (name, declared size) and the trailer."""
    out = b""
    for i, (name, size) in enumerate([*members, ("TRAILER!!!", 0)]):
        encoded = name.encode() + b"\0"
        fields = (i + 1, 0o100644, 0, 0, 1, 0, size, 0, 0, 0, 0, len(encoded), 0)
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        out += header + encoded + bytes(-(len(header) + len(encoded)) % 4)
    return out


def gzip_bomb(path: Path, inflated: int) -> None:
    """A gzip'd cpio whose one member claims 4 GiB and is followed by ``inflated`` zero bytes."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(8 * MIB)
    with path.open("wb") as f:
        f.write(comp.compress(cpio([("usr/sbin/qemu-ga", 0xFFFFFFFF)])[:-124]))
        for _ in range(inflated // len(zeros)):
            f.write(comp.compress(zeros))
        f.write(comp.flush())


def bomb(sb: Sandbox) -> str:
    gzip_bomb(sb.work / "initramfs.cpio.gz", 3 << 30)
    assert (sb.work / "initramfs.cpio.gz").stat().st_size < 8 * MIB  # a few MB that inflate to 3 GiB
    return "initramfs.cpio.gz"


def dir_with_initrd(data: bytes) -> Build:
    def build(sb: Sandbox) -> str:
        (sb.work / "img").mkdir()
        (sb.work / "img" / "initramfs.cpio").write_bytes(data)
        image_dir(sb)
        return "img"

    return build


VALIDATE_INVALID: list[tuple[str, Build, str]] = [
    (
        "qcow2-backing-absolute",
        qcow2_backed_by("x.qcow2", "SECRET"),
        r"backing file names '.*secret', an absolute",
    ),
    (
        "qcow2-backing-up",
        qcow2_backed_by("x.qcow2", "../canary/secret"),
        r"which leaves the image's directory",
    ),
    (
        "qcow2-backing-json",
        qcow2_backed_by("x.qcow2", 'json:{"driver":"file","filename":"SECRET"}'),
        r"JSON filename",
    ),
    ("qcow2-data-file-up", qcow2_with_data_file("../canary/d.raw"), r"data-file names .* which leaves"),
    ("qcow2-data-file-link", linked_data_file, r"symbolic link"),
    (
        "vmdk-extent-up",
        flat_vmdk("../canary/secret"),
        r"names '\.\./canary/secret', which leaves the VM directory",
    ),
    ("vmdk-extent-absolute", flat_vmdk("SECRET"), r"an absolute path"),
    ("vmdk-extent-link", linked_flat_extent, r"x-flat\.vmdk.*symbolic link"),
    ("vmdk-no-extents", vmdk_without_extents, r"names no extents"),
    ("vm-disk-outside", vm_disk_at("../canary/x.vmdk"), r"which leaves the VM directory"),
    ("vm-disk-absolute", vm_disk_at("SECRET"), r"an absolute path"),
    ("vm-flat-extent-link", vm_with_link("base-s001.vmdk"), r"base-s001\.vmdk.*symbolic link"),
    ("vm-nvram-link", vm_with_link("base.nvram"), r"base\.nvram.*symbolic link"),
    ("text-as-qcow2", file_of("x.qcow2", TEXT), r"is not a qcow2 image"),
    ("qcow2-magic-then-zeros", file_of("z.qcow2", b"QFI\xfb" + bytes(508)), r"is not a readable qcow2 image"),
    ("qcow2-truncated", truncated_qcow2, r"is not a readable qcow2 image"),
    ("dir-initrd-link", dir_with_link("initramfs.cpio"), r"symbolic link"),
    ("dir-disk-backing-host", dir_disk_escaping, r"an absolute path"),
    ("initrd-gzip-bomb", bomb, r"inflates to more than 1024 MiB"),
    ("initrd-corrupt-cpio", file_of("i.cpio", b"070701" + b"zz" * 60), r"not a newc cpio archive"),
    (
        "initrd-corrupt-gzip",
        file_of("i.cpio.gz", b"\x1f\x8b\x08\x00" + bytes(range(256))),
        r"compressed stream is corrupt",
    ),
    (
        "initrd-cut-gzip",
        lambda sb: file_of("i.cpio.gz", gzip.compress(cpio([("init", 100)]))[:40])(sb),
        r"unreadable",
    ),
    ("dir-initrd-corrupt-cpio", dir_with_initrd(b"070701" + b"\xff" * 200), r"not a newc cpio archive"),
]


@pytest.mark.parametrize(
    ("build", "sentence"), [c[1:] for c in VALIDATE_INVALID], ids=[c[0] for c in VALIDATE_INVALID]
)
def test_validate_calls_it_invalid(sandbox: Sandbox, build: Build, sentence: str) -> None:
    path = build(sandbox)
    outcome, errors = validate(sandbox, path)
    assert_invalid(sandbox, outcome, errors, sentence)


def test_validate_boot_never_hands_a_host_file_to_the_guest(sandbox: Sandbox) -> None:
    image = qcow2_backed_by("x.qcow2", "SECRET")(sandbox)
    outcome, errors = validate(sandbox, image, "--boot")
    assert_invalid(sandbox, outcome, errors, r"backing file names '.*secret', an absolute path")
    assert not any(".boot" in f["place"] for f in errors)  # refused before QEMU was started


def test_validate_accepts_a_backing_file_inside_the_directory(sandbox: Sandbox) -> None:
    """The control: a chain that stays inside (and the qcow2 it ends in) is not an error."""
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=sandbox.work)
    qemu_img(
        "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", "top.qcow2", "4M", cwd=sandbox.work
    )
    outcome, errors = validate(sandbox, "top.qcow2")
    assert outcome.code == 0 and not errors, outcome
    assert not sandbox.changes()


@pytest.mark.parametrize("name", ["vmlinuz", "x.qcow2", "x.vmdk"])
def test_validate_does_not_wait_on_a_fifo(sandbox: Sandbox, name: str) -> None:
    """A FIFO named like an image: telling what it is must not open it for reading (that blocks)."""
    os.mkfifo(sandbox.work / name)
    outcome = sandbox.run(["validate", name])
    sandbox.assert_refused(outcome, 3, rf"{re.escape(name)} is a FIFO")
