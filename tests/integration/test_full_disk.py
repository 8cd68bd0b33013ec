"""A volunteer's disk fills up mid-task: the task waits and resumes, it is never lost.

The emulated client's data directory lies on a small ext4 file system of its own (a loop
device; no blocks reserved for root, so the wrapper and QEMU, root here, meet the full
disk as a volunteer's ``boinc`` user would). Once two checkpoints are committed another
program takes every free block: the next checkpoint cannot be written. The wrapper must
say that the disk is full, exit temporarily, and, once the blocks are given back, resume
from its last committed checkpoint to the right result.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.boinc.files import TEMPORARY_EXIT_FILE
from boincvm.wrapper.status import StatusReport
from tests.integration.jobs import bound, task_log
from tests.integration.test_run_local import FAULTED, app_version, longjob_wu, run

pytestmark = pytest.mark.integration

__all__ = ["app_version"]  # the module's fixture, shared

#: The file system's size: the app version's copy (about 170 MB) and the host check's
#: need (twice the guest's memory plus 256 MiB), with room to spare. The image file is
#: sparse: it takes on the host only what is written into it.
SIZE_MB = 1400
#: Bytes the hog leaves free: the wrapper's small files still fit, a checkpoint does not.
LEFT = 1 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    image, mount = tmp_path / "disk.img", tmp_path / "disk"
    mount.mkdir()
    with image.open("wb") as f:
        f.truncate(SIZE_MB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, timeout=120)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True, timeout=60)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False, timeout=60)


class DiskHog(threading.Thread):
    """Takes the disk's free blocks but :data:`LEFT` once ``checkpoints`` are committed, and gives them back
    once the wrapper has exited temporarily (keeping what its exit file said)."""

    def __init__(self, disk: Path, slot: Path, checkpoints: int = 2) -> None:
        super().__init__(daemon=True)
        self.disk, self.slot, self.checkpoints = disk, slot, checkpoints
        self.filled = self.freed = False
        self.exit_text = ""

    def run(self) -> None:
        deadline = time.monotonic() + bound(240)
        while time.monotonic() < deadline:
            status = StatusReport.read(self.slot)
            if status is not None and status.checkpoints >= self.checkpoints:
                break
            time.sleep(0.05)
        else:
            return
        hog = self.disk / "hog"
        with hog.open("wb") as f:
            st = os.statvfs(self.disk)
            os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - LEFT)
        self.filled = True
        exit_file = self.slot / TEMPORARY_EXIT_FILE
        while time.monotonic() < deadline and not exit_file.exists():
            time.sleep(0.05)
        self.exit_text = exit_file.read_text(errors="replace") if exit_file.exists() else ""
        hog.unlink()
        self.freed = True


def test_a_full_disk_postpones_the_task_and_it_resumes_from_its_last_checkpoint(
    app_version: Path, small_disk: Path, tmp_path: Path
) -> None:
    data_dir = small_disk / "client"
    hog = DiskHog(small_disk, data_dir / "slots" / "0")
    hog.start()
    summary = run(longjob_wu(tmp_path, FAULTED), app_version, data_dir, tmp_path)
    hog.join(timeout=bound(60))
    assert hog.filled and hog.freed, summary.events
    # The volunteer reads why: the disk, not an "Input/output error" of the VM.
    assert "the slot's disk is full" in hog.exit_text, hog.exit_text
    assert summary.ok, summary.message + summary.stderr_tail
    assert summary.starts == 2, summary.events
    assert "resuming from checkpoint" in task_log(summary), summary.stderr_tail
    assert (tmp_path / "results/out").read_text() == FAULTED.expected_out
