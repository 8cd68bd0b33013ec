"""Pinning a golden checkpoint into a task's directory: links on one file system, the
cache's own files across file systems (a real second mount: /dev/shm)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.hypervisor.qemu import golden as qemu_golden


def _golden(root: Path, *, base: bool = True) -> qemu_golden.Golden:
    root.mkdir(parents=True)
    for name in (qemu_golden.GOLDEN_DISK, qemu_golden.GOLDEN_STATE, qemu_golden.GOLDEN_RAM):
        (root / name).write_bytes(name.encode())
    if base:
        (root / qemu_golden.GOLDEN_BASE).write_bytes(b"base")
    disk, state, ram = (
        root / n for n in (qemu_golden.GOLDEN_DISK, qemu_golden.GOLDEN_STATE, qemu_golden.GOLDEN_RAM)
    )
    return qemu_golden.Golden(disk=disk, state=state, ram=ram)


@pytest.fixture
def other_mount() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="boincvm-test-") as d:
        yield Path(d)


def _same_inode(a: Path, b: Path) -> bool:
    sa, sb = a.stat(), b.stat()
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@pytest.mark.parametrize("base", [True, False], ids=["with-base", "no-disk-image"])
def test_pin_links_the_disk_its_base_and_the_ram(tmp_path: Path, base: bool) -> None:
    g = _golden(tmp_path / "cache/key", base=base)
    (tmp_path / "vm/golden").mkdir(parents=True)
    (tmp_path / "vm/golden/stale").write_text("from an earlier VM")
    pinned = qemu_golden.pin(g, tmp_path / "vm/golden")
    assert pinned.disk == tmp_path / "vm/golden" / qemu_golden.GOLDEN_DISK
    assert pinned.ram == tmp_path / "vm/golden" / qemu_golden.GOLDEN_RAM
    assert pinned.state == g.state  # read once at the start: stays in the cache
    assert _same_inode(pinned.disk, g.disk) and _same_inode(pinned.ram, g.ram)
    names = {p.name for p in (tmp_path / "vm/golden").iterdir()}
    want = {qemu_golden.GOLDEN_DISK, qemu_golden.GOLDEN_RAM} | ({qemu_golden.GOLDEN_BASE} if base else set())
    assert names == want
    for p in (g.disk, g.ram):  # the cache may go: the links keep the data
        p.unlink()
    assert pinned.ram.read_bytes() == qemu_golden.GOLDEN_RAM.encode()


def test_pin_across_file_systems_uses_the_cache_and_leaves_nothing(tmp_path: Path, other_mount: Path) -> None:
    g = _golden(other_mount / "key")
    assert g.disk.stat().st_dev != tmp_path.stat().st_dev
    into = tmp_path / "vm/golden"
    assert qemu_golden.pin(g, into) == g
    assert not into.exists()
