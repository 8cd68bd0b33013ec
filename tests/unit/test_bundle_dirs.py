"""The frozen wrapper's clean-up of staticx directories that killed wrappers left behind."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from boincvm.wrapper.bundle_dirs import MARKER, remove_abandoned, tidy

#: Holds an exclusive flock on argv[1] until its stdin closes: a live wrapper elsewhere.
_HOLDER = (
    "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
    "print('held', flush=True); sys.stdin.read()"
)


def _marked(d: Path) -> Path:
    d.mkdir()
    (d / MARKER).write_bytes(b"")
    (d / "libc.so.6").write_bytes(b"\x7fELF")
    return d


def test_only_marked_unlocked_staticx_directories_of_killed_wrappers_go(tmp_path: Path) -> None:
    own = tmp_path / "staticx-OWN123"
    own.mkdir()
    dead = _marked(tmp_path / "staticx-DEAD01")
    held = _marked(tmp_path / "staticx-HELD01")
    foreign = tmp_path / "staticx-OTHER1"  # another program's staticx, or a wrapper starting
    foreign.mkdir()
    (foreign / "libc.so.6").write_bytes(b"")
    unrelated = _marked(tmp_path / "not-staticx")
    (tmp_path / "staticx-LINK01").symlink_to(dead, target_is_directory=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(held / MARKER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        tidy(own)
        assert not dead.exists()
        assert held.exists() and foreign.exists() and unrelated.exists() and own.exists()
        assert (own / MARKER).is_file()
        # Our own directory is held now: another wrapper's sweep leaves it alone (and a link
        # named like a staticx directory is never followed).
        assert remove_abandoned(tmp_path / "staticx-NEXT01") == []
        assert own.exists() and (tmp_path / "staticx-LINK01").is_symlink()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    # The holder has exited (as a killed wrapper would): its directory goes at the next sweep.
    assert remove_abandoned(own) == [held]
    assert not held.exists() and foreign.exists() and unrelated.exists()


def test_the_live_marker_is_locked_under_its_final_name(tmp_path: Path) -> None:
    own = tmp_path / "staticx-OWN456"
    own.mkdir()
    tidy(own)
    assert sorted(p.name for p in own.iterdir()) == [MARKER]
    fd = os.open(own / MARKER, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            raise AssertionError("the marker of a live wrapper could be locked by another")
    finally:
        os.close(fd)
