"""The golden cache keeps what VMs use and removes what none used for a month."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from boincvm.hypervisor.qemu import golden as qemu_golden

DAY = 86400.0


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    r = tmp_path / "cache/boincvm/golden"
    r.mkdir(parents=True)
    return r


def _entry(root: Path, name: str, built_days_ago: float, used_days_ago: float | None = None) -> Path:
    d = root / name
    d.mkdir()
    for f in (qemu_golden.GOLDEN_DISK, qemu_golden.GOLDEN_STATE, qemu_golden.GOLDEN_RAM):
        (d / f).write_bytes(b"x")
    if used_days_ago is not None:
        (d / qemu_golden.USED).touch()
        t = time.time() - used_days_ago * DAY
        os.utime(d / qemu_golden.USED, (t, t))
    t = time.time() - built_days_ago * DAY
    os.utime(d, (t, t))
    return d


def test_prune_removes_only_what_no_vm_used_for_a_month(root: Path) -> None:
    _entry(root, "fresh", built_days_ago=1)
    _entry(root, "old-but-used", built_days_ago=90, used_days_ago=2)
    _entry(root, "old", built_days_ago=45)
    _entry(root, "used-long-ago", built_days_ago=90, used_days_ago=31)
    (root / "not-a-dir").write_text("left alone")
    removed = qemu_golden.prune()
    assert sorted(removed) == ["old", "used-long-ago"]
    assert sorted(p.name for p in root.iterdir()) == ["fresh", "not-a-dir", "old-but-used"]
    assert qemu_golden.find("old-but-used") is not None
    assert qemu_golden.prune() == []  # nothing more to do


def test_prune_removes_killed_builds_but_not_running_ones(root: Path) -> None:
    killed = root / ".k1.build-abc"
    running = root / ".k2.build-def"
    aside = root / ".k3.pruned-99"
    for d in (killed, running, aside):
        (d / "vm").mkdir(parents=True)
    t = time.time() - 2 * DAY
    for d in (killed, aside):
        os.utime(d, (t, t))
    assert sorted(qemu_golden.prune()) == sorted([aside.name, killed.name])
    assert [p.name for p in root.iterdir()] == [running.name]


def test_prune_to_a_size_removes_the_least_recently_used_but_not_the_recent(root: Path) -> None:
    """A test run's one-off images leave goldens that no later run uses: trimmed by size."""
    for name, used in (("a", 5.0), ("b", 3.0), ("c", 2.0), ("d", 0.01), ("e", 0.001)):
        d = _entry(root, name, built_days_ago=10, used_days_ago=used)
        (d / qemu_golden.GOLDEN_RAM).write_bytes(b"r" * (1 << 20))
    one = sum(f.stat().st_blocks * 512 for f in (root / "a").iterdir())
    assert qemu_golden.prune(keep_bytes=5 * one) == []  # nothing idle for a month, all fits
    _entry(root, "old", built_days_ago=40)
    assert sorted(qemu_golden.prune(keep_bytes=2 * one)) == ["a", "b", "c", "old"]
    assert sorted(p.name for p in root.iterdir()) == ["d", "e"]
    # used within the last hour: kept even beyond the size
    assert qemu_golden.prune(keep_bytes=0) == []
    assert sorted(p.name for p in root.iterdir()) == ["d", "e"]


def test_mark_used_touches_only_golden_entries(root: Path, tmp_path: Path) -> None:
    d = _entry(root, "k", built_days_ago=60)
    qemu_golden.mark_used(d / qemu_golden.GOLDEN_RAM)
    assert time.time() - (d / qemu_golden.USED).stat().st_mtime < 60
    assert qemu_golden.prune() == []
    elsewhere = tmp_path / "vm"
    elsewhere.mkdir()
    qemu_golden.mark_used(elsewhere / qemu_golden.GOLDEN_RAM)  # a build VM's own RAM file
    build = root / ".k.build-x" / "vm"
    build.mkdir(parents=True)
    qemu_golden.mark_used(build / qemu_golden.GOLDEN_RAM)
    assert not (elsewhere / qemu_golden.USED).exists() and not (build / qemu_golden.USED).exists()


def test_prune_of_a_missing_cache_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "none"))
    assert qemu_golden.prune() == []
    assert not (tmp_path / "none").exists()
