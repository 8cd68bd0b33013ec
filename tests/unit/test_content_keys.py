"""Cache keys by content: every project directory's copy of an app version's kernel shares one
golden checkpoint (and one KVM verdict), and a changed kernel never reuses an old one.

Before, the golden key named the kernel by path and modification time, so each BOINC data
directory (each with its own project directory) booted and saved its own golden checkpoint:
71 of them in one cache after a test session, and no page sharing between tasks of
different data directories.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from boincvm.cache import cache_root, content_digest
from boincvm.hypervisor.base import VmSpec
from boincvm.hypervisor.qemu.golden import golden_key


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _copies(tmp_path: Path, data: bytes) -> tuple[Path, Path]:
    a = tmp_path / "projects/a/app_1.00_0123456789ab_vm_kernel"
    b = tmp_path / "projects/b/app_1.00_0123456789ab_vm_kernel"
    for p in (a, b):
        p.parent.mkdir(parents=True)
        p.write_bytes(data)
    os.utime(b, ns=(1, 1))  # another copy, another time
    return a, b


def test_copies_have_one_digest_and_it_is_remembered(tmp_path: Path) -> None:
    a, b = _copies(tmp_path, b"kernel" * 100_000)
    da = content_digest(a)
    assert da == content_digest(b)
    assert len(da) == 64
    memos = list((cache_root() / "digests").iterdir())
    assert len(memos) == 2 and all(m.read_text() == da for m in memos)
    # Remembered: a memo says what the digest is without reading the file again.
    memos[0].write_text("f" * 64)
    memos[1].write_text("f" * 64)
    assert content_digest(a) == "f" * 64


def test_a_changed_file_gets_a_new_digest_and_a_bad_memo_is_recomputed(tmp_path: Path) -> None:
    a, _ = _copies(tmp_path, b"one")
    first = content_digest(a)
    a.write_bytes(b"two")
    os.utime(a, ns=(2, 2))
    assert content_digest(a) != first
    for memo in (cache_root() / "digests").iterdir():
        memo.write_text("not a digest")
    assert content_digest(a) == content_digest(a) != first


def test_one_golden_key_for_every_copy_of_a_kernel_and_a_new_one_when_it_changes(tmp_path: Path) -> None:
    a, b = _copies(tmp_path, b"kernel" * 1000)
    initrd_a = a.with_name("initrd")
    shutil.copyfile(a, initrd_a)
    initrd_b = b.with_name("initrd")
    shutil.copyfile(a, initrd_b)

    def key(kernel: Path, initrd: Path, memory_mb: int = 256) -> str:
        spec = VmSpec(name="t", workdir=tmp_path / "vm", kernel=kernel, initrd=initrd, memory_mb=memory_mb)
        return golden_key(spec, "tcg", "q35", "qemu")

    assert key(a, initrd_a) == key(b, initrd_b)
    assert key(a, initrd_a) != key(a, initrd_a, memory_mb=512)
    b.write_bytes(b"another kernel")
    assert key(a, initrd_a) != key(b, initrd_b)
