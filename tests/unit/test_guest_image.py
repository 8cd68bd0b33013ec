"""Pure parts of the guest build and the QEMU backend: descriptor, cpio, ELF, command line."""

from __future__ import annotations

import io
import json
import shutil
import stat
import sys
from pathlib import Path

import pytest

from boincvm.errors import InputError
from boincvm.hypervisor.qemu import cmdline as cl
from boincvm.image import elf
from boincvm.image.cpio import Entry, write_newc
from boincvm.image.descriptor import DESCRIPTOR_NAME, ImageDescriptor, ImageFormat, spec_for_image
from boincvm.image.guest import RECIPES, input_hash, recipe


def _descriptor() -> ImageDescriptor:
    return ImageDescriptor(
        format=ImageFormat.KERNEL_INITRD,
        kernel="vmlinux",
        initrd="initramfs.cpio",
        disk="scratch.qcow2",
        kernel_cmdline="console=ttyS0",
        packages={"qemu-guest-agent": "1:7.2"},
    )


def test_descriptor_round_trip(tmp_path: Path) -> None:
    desc = _descriptor()
    path = desc.save(tmp_path)
    assert path.name == DESCRIPTOR_NAME
    assert json.loads(path.read_text())["format"] == "kernel+initrd"
    assert ImageDescriptor.load(tmp_path) == desc
    assert ImageDescriptor.load(path) == desc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema": 2}, "schema: expected 1"),
        ({"format": "iso"}, "format: must be one of"),
        ({"kernel": "../vmlinux"}, "kernel: must be a plain file name"),
        ({"initrd": None}, "must name its kernel and initrd"),
        ({"memory_mb": "lots"}, "memory_mb: must be an integer"),
    ],
)
def test_descriptor_errors_name_their_place(tmp_path: Path, change: dict[str, object], message: str) -> None:
    data = {**_descriptor().to_dict(), **change}
    (tmp_path / DESCRIPTOR_NAME).write_text(json.dumps(data))
    with pytest.raises(InputError, match=message):
        ImageDescriptor.load(tmp_path)


def test_missing_descriptor_hints_at_build_image(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        ImageDescriptor.load(tmp_path)
    assert info.value.hint is not None and "build-image" in info.value.hint


def test_spec_for_image(tmp_path: Path) -> None:
    _descriptor().save(tmp_path)
    spec = spec_for_image(tmp_path, name="x", workdir=tmp_path / "wd", memory_mb=512)
    assert spec.kernel == tmp_path / "vmlinux" and spec.image == tmp_path / "scratch.qcow2"
    assert spec.memory_mb == 512 and spec.kernel_cmdline == "console=ttyS0"


def test_cpio_newc_is_readable_by_cpio(tmp_path: Path) -> None:
    buf = io.BytesIO()
    entries = [Entry.dir("bin"), Entry.file("bin/x", b"abc", executable=True), Entry.symlink("bin/y", "x"),
               Entry.chardev("console", 5, 1)]  # fmt: skip
    write_newc(buf, entries)
    data = buf.getvalue()
    assert len(data) % 4 == 0 and data.startswith(b"070701") and b"TRAILER!!!" in data
    cpio = shutil.which("cpio")
    assert cpio, "cpio is installed by scripts/bootstrap.sh"
    from boincvm import proc

    listing = proc.run([cpio, "-itv"], input=data, timeout=30).text
    assert "bin/x" in listing and "bin/y -> x" in listing and listing.splitlines()[-1].startswith("crw")
    proc.run([cpio, "-id", "--quiet"], input=data, timeout=30, cwd=tmp_path)
    assert (tmp_path / "bin" / "x").read_bytes() == b"abc"
    assert stat.S_IMODE((tmp_path / "bin" / "x").stat().st_mode) == 0o755


def test_cpio_is_deterministic() -> None:
    a, b = io.BytesIO(), io.BytesIO()
    write_newc(a, [Entry.file("f", b"1")])
    write_newc(b, [Entry.file("f", b"1")])
    assert a.getvalue() == b.getvalue()


def test_elf_needed_libraries_of_the_python_binary() -> None:
    exe = Path(sys.executable).resolve()
    needed = elf.needed_libraries(exe)
    assert any(n.startswith("libc.so") for n in needed) or needed == []
    with pytest.raises(InputError, match="not a 64-bit"):
        elf.needed_libraries(Path(__file__))


def test_pvh_note_absent_in_an_ordinary_binary() -> None:
    assert not elf.has_pvh_entry(Path(sys.executable).resolve().read_bytes())
    assert not elf.has_pvh_entry(b"not elf")


def test_recipe_and_hash() -> None:
    rec = recipe("minimal")
    assert "qemu-guest-agent" in rec.packages and "virtio_console" in rec.modules
    h1 = input_hash(rec, {"a": "1"})
    assert h1 == input_hash(rec, {"a": "1"}) and h1 != input_hash(rec, {"a": "2"})
    with pytest.raises(InputError, match="unknown image recipe"):
        recipe("huge")
    assert set(RECIPES) == {"minimal"}


def _args(**kw: object) -> cl.QemuArgs:
    base: dict[str, object] = {"name": "vm1", "accel": "tcg", "machine": "pc", "memory_mb": 256, "ncpus": 1,
                               "disk": Path("disk.qcow2"), "attach_disk": True}  # fmt: skip
    base.update(kw)
    return cl.QemuArgs(**base)  # type: ignore[arg-type]


def test_command_line_defaults_are_private_and_offline() -> None:
    argv = cl.build_argv(_args(kernel=Path("/k"), initrd=Path("/i"), cmdline="quiet"))
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert "-nic none" in joined and "-nodefaults" in argv and "-no-reboot" in argv
    assert "unix:qmp.sock,server=on,wait=off" in argv
    assert "virtio-serial-pci,id=vser0" in argv and "virtio-blk-pci,drive=disk0" in argv
    assert argv[argv.index("-append") + 1] == "quiet" and "-S" not in argv and "-cpu" not in argv


def test_command_line_variants() -> None:
    net = cl.build_argv(_args(network=True, accel="kvm", loadvm="ck1", attach_disk=False))
    assert "user,id=net0" in net and "-nic" not in net and net[net.index("-cpu") + 1] == "host"
    assert net[net.index("-loadvm") + 1] == "ck1" and not any(a.startswith("virtio-blk") for a in net)
    micro = cl.build_argv(_args(machine="microvm", kernel=Path("/k"), cmdline="quiet", tsc_khz=2100000))
    assert "virtio-serial-device,id=vser0" in micro
    assert micro[micro.index("-append") + 1] == "quiet tsc_early_khz=2100000"
    q35 = cl.build_argv(_args(machine="q35", kernel=Path("/k"), cmdline="quiet tsc_early_khz=1", tsc_khz=2))
    assert q35[q35.index("-append") + 1] == "quiet tsc_early_khz=1"  # the image's own value wins
    assert "pcie-root-port,id=hotplug0,bus=pcie.0,chassis=1" not in q35
    q35 = cl.build_argv(_args(machine="q35", incoming="fd:7", hotplug_port=True))
    assert q35[q35.index("-incoming") + 1] == "fd:7" and "-loadvm" not in q35
    assert "pcie-root-port,id=hotplug0,bus=pcie.0,chassis=1" in q35
    disk_boot = cl.build_argv(_args())
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in disk_boot
    with pytest.raises(ValueError, match="machine must be one of"):
        cl.build_argv(_args(machine="isapc"))


def test_command_line_memory_backend_and_translation_cache() -> None:
    tcg = cl.build_argv(_args())
    assert tcg[tcg.index("-accel") + 1] == f"tcg,tb-size={cl.TCG_TB_SIZE_MB}"
    assert tcg[tcg.index("-machine") + 1] == "pc" and "-object" not in tcg
    kvm = cl.build_argv(_args(accel="kvm"))
    assert kvm[kvm.index("-accel") + 1] == "kvm"
    # Golden RAM: mapped shared by the VM that saves it, privately (copy-on-write) by jobs;
    # the backend keeps the id QEMU gives the RAM of -m, so snapshots stay interchangeable.
    saver = cl.build_argv(_args(machine="q35", ram_file=Path("/g/golden.ram"), ram_shared=True))
    assert saver[saver.index("-machine") + 1] == "q35,memory-backend=pc.ram"
    assert saver[saver.index("-object") + 1] == (
        "memory-backend-file,id=pc.ram,size=256M,mem-path=/g/golden.ram,share=on"
    )
    assert saver[saver.index("-m") + 1] == "256"
    job = cl.build_argv(_args(machine="microvm", ram_file=Path("/g/golden.ram")))
    assert job[job.index("-machine") + 1] == "microvm,memory-backend=microvm.ram"
    assert job[job.index("-object") + 1].endswith(",share=off")


def test_host_tsc_khz() -> None:
    assert cl.host_tsc_khz("processor\t: 0\ncpu MHz\t\t: 2100.000\n") == 2100000
    assert cl.host_tsc_khz("nothing") is None
