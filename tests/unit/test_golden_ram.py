"""The golden build's RAM file: booted from a tmpfs file when one has room, copied into the
cache with its zero blocks left as holes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boincvm.hypervisor.qemu import golden as qemu_golden

MIB = 1 << 20


def test_copy_nonzero_keeps_the_bytes_and_leaves_zeros_as_holes(tmp_path: Path) -> None:
    src = tmp_path / "ram"
    with src.open("wb") as f:
        f.truncate(8 * MIB)  # a hole the guest never touched
        f.seek(MIB)
        f.write(bytes(2 * MIB))  # pages it zeroed (init_on_free)
        f.seek(3 * MIB + 4096)
        f.write(os.urandom(3 * 4096))  # pages it holds
        f.seek(8 * MIB - 100)
        f.write(b"end" * 10)  # a tail block, not page-aligned
    dst = tmp_path / "golden.ram"
    fd = os.open(src, os.O_RDONLY)
    try:
        qemu_golden.copy_nonzero(fd, dst)
    finally:
        os.close(fd)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == 8 * MIB
    assert dst.stat().st_blocks * 512 <= 8 * 4096  # only the four data blocks are stored


def test_dig_holes_makes_zero_blocks_holes_in_place(tmp_path: Path) -> None:
    """The path when no tmpfs had room: the file the VM wrote, its zero blocks punched out."""
    ram = tmp_path / "ram"
    data = os.urandom(3 * 4096)
    with ram.open("wb") as f:
        f.write(bytes(2 * MIB))  # written zeros: stored blocks before
        f.write(data)
        f.truncate(4 * MIB)  # and a hole
    before = ram.read_bytes()
    qemu_golden.dig_holes(ram)
    assert ram.read_bytes() == before
    assert ram.stat().st_blocks * 512 <= 4 * 4096  # the data blocks, no more


def test_scratch_ram_needs_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_golden, "SCRATCH_DIRS", (tmp_path / "missing", tmp_path))
    found = qemu_golden._scratch_ram(1)
    assert found is not None
    path, fd = found
    os.close(fd)
    assert path.parent == tmp_path and path.name.startswith("boincvm-golden-")
    assert qemu_golden._scratch_ram(1 << 40) is None  # a 1 EiB guest fits nowhere
