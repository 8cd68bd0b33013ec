"""Large files through the hot-plugged transfer disk, against real guests under TCG."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.errors import OutputError
from boincvm.hypervisor.qemu import xfer as qemu_xfer
from boincvm.hypervisor.qemu.backend import QemuBackend
from boincvm.image.descriptor import spec_for_image

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
EVERY_FILE = {"transfer_disk_min_bytes": "0"}


def make_vm(image: Path, workdir: Path, name: str, **options: str) -> QemuBackend:
    return QemuBackend(spec_for_image(image, name=name, workdir=workdir, boot_timeout=60, options=options))


def binary(size: int) -> bytes:
    """Every byte value, then random bytes: nothing text-like survives by luck."""
    return (bytes(range(256)) + os.urandom(size))[:size]


def guest_sha256(vm: QemuBackend, path: str) -> str:
    st = vm.run_program(["sha256sum", path], timeout=60)
    assert st.succeeded, st
    return st.stdout_tail.split()[0].decode()


def peripherals(vm: QemuBackend) -> list[str]:
    return [p["name"] for p in vm.qmp("qom-list", {"path": "/machine/peripheral"})]


def round_trip(vm: QemuBackend, tmp_path: Path, size: int, guest: str) -> None:
    data = binary(size)
    src = tmp_path / f"in-{size}.bin"
    src.write_bytes(data)
    before = vm._transfer.copies
    vm.copy_to_guest(src, guest)
    assert guest_sha256(vm, guest) == hashlib.sha256(data).hexdigest()
    back = tmp_path / f"out-{size}.bin"
    assert vm.copy_from_guest(guest, back) == size
    assert back.read_bytes() == data
    assert vm._transfer.copies == before + 2, "the copies did not go through the transfer disk"
    assert not [n for n in peripherals(vm) if n.startswith(qemu_xfer.PREFIX)]


@pytest.fixture(scope="module")
def vm(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QemuBackend]:
    backend = make_vm(guest_image, tmp_path_factory.mktemp("xfer"), "xfer", **EVERY_FILE)
    with backend:
        backend.power_on()
        backend.wait_for_tools()
        yield backend


@pytest.mark.parametrize("size", [0, 1, 513, 4 * MiB + 7])
def test_round_trip_through_the_disk(vm: QemuBackend, tmp_path: Path, size: int) -> None:
    round_trip(vm, tmp_path, size, f"/scratch/boincvm/odd 'name' $x-{size}.bin")


def test_copy_out_refuses_a_file_above_max_bytes(vm: QemuBackend, tmp_path: Path) -> None:
    vm.run_program(["/bin/sh", "-c", "head -c 4194305 /dev/urandom > /tmp/big"], timeout=30)
    before = vm._transfer.copies
    target = tmp_path / "big"
    with pytest.raises(OutputError, match="is 4194305 bytes, more than the 4194304 allowed"):
        vm.copy_from_guest("/tmp/big", target, max_bytes=4 * MiB)
    with pytest.raises(OutputError, match="does not exist"):
        vm.copy_from_guest("/tmp/none", target, max_bytes=4 * MiB)
    assert list(tmp_path.iterdir()) == []
    assert vm._transfer.copies == before, "the size is checked before a disk is plugged"
    assert vm.copy_from_guest("/tmp/big", target, max_bytes=4 * MiB + 1) == 4 * MiB + 1
    assert hashlib.sha256(target.read_bytes()).hexdigest() == guest_sha256(vm, "/tmp/big")
    assert vm._transfer.copies == before + 1
    assert [p.name for p in tmp_path.iterdir()] == ["big"]


def test_small_files_keep_the_agent_path(vm: QemuBackend, tmp_path: Path) -> None:
    settings = vm._transfer.settings
    vm._transfer.settings = qemu_xfer.Settings(enabled=True)
    try:
        before = vm._transfer.copies
        src = tmp_path / "small"
        src.write_bytes(binary(qemu_xfer.MIN_BYTES - 1))
        vm.copy_to_guest(src, "/tmp/small")
        assert vm.copy_from_guest("/tmp/small", tmp_path / "back") == qemu_xfer.MIN_BYTES - 1
        assert (tmp_path / "back").read_bytes() == src.read_bytes()
        assert vm._transfer.copies == before
    finally:
        vm._transfer.settings = settings


def test_a_snapshot_after_a_transfer_restores_in_a_new_process(guest_image: Path, tmp_path: Path) -> None:
    work = tmp_path / "vm"
    data = binary(4 * MiB + 3)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    with make_vm(guest_image, work, "xfer-ckpt", **EVERY_FILE) as first:
        first.power_on()
        first.wait_for_tools()
        first.copy_to_guest(src, "/scratch/boincvm/in.bin")
        assert first.copy_from_guest("/scratch/boincvm/in.bin", tmp_path / "first.bin") == len(data)
        assert first._transfer.copies == 2
        first.snapshot_create("after-transfer")
    with make_vm(guest_image, work, "xfer-ckpt", **EVERY_FILE) as second:
        second.power_on(snapshot="after-transfer")
        assert guest_sha256(second, "/scratch/boincvm/in.bin") == hashlib.sha256(data).hexdigest()
        assert second.copy_from_guest("/scratch/boincvm/in.bin", tmp_path / "second.bin") == len(data)
        assert (tmp_path / "second.bin").read_bytes() == data
        assert second._transfer.copies == 1
        second.snapshot_create("again")  # the device set is back to what the snapshot holds
        second.snapshot_revert("after-transfer")


def test_q35_plugs_into_its_root_port(guest_image: Path, tmp_path: Path) -> None:
    with make_vm(guest_image, tmp_path / "vm", "xfer-q35", machine="q35", **EVERY_FILE) as vm:
        vm.power_on()
        vm.wait_for_tools()
        round_trip(vm, tmp_path, 4 * MiB + 5, "/tmp/q35.bin")
        round_trip(vm, tmp_path, 511, "/tmp/q35-small.bin")


def test_a_refused_disk_leaves_no_node_and_no_copy_waiting(vm: QemuBackend, tmp_path: Path) -> None:
    """The guest's side of a copy starts before the disk is plugged; when QEMU refuses the
    disk (here its file is gone), the copy fails with QEMU's reason, and neither a block
    node nor the guest's script, which would wait 30 s for the disk, is left behind."""
    from boincvm.errors import HypervisorError

    with pytest.raises(HypervisorError, match="gone.bin"):
        vm._transfer.push(tmp_path / "gone.bin", "/tmp/refused.bin", MiB)
    nodes = vm.qmp("query-named-block-nodes", {"flat": True})
    assert not [n for n in nodes if str(n.get("node-name", "")).startswith(qemu_xfer.PREFIX)]
    # Every process's command line (the pattern does not match its own text).
    look = 'for f in /proc/[0-9]*/cmdline; do tr "\\0" " " < "$f"; echo; done | grep -c "boincvm-[x]fer"'
    left = vm.run_program(["/bin/sh", "-c", look], timeout=30)
    assert left.stdout_tail.strip() == b"0", left
    assert vm.run_program(["test", "-e", "/tmp/refused.bin"], timeout=30).exit_code == 1
    round_trip(vm, tmp_path, MiB + 1, "/tmp/after-refused.bin")  # the next copy takes the disk
