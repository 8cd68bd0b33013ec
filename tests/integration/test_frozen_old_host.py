"""The frozen wrapper starts on an older host: Debian 11 (glibc 2.31), no Python, no QEMU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from boincvm import __version__
from boincvm.appversion.frozen import frozen_wrapper
from tests.old_host import MOUNT_POINT, build_root, glibc_version, run_in_root

pytestmark = pytest.mark.integration

#: In the root: a slot-like working directory on its tmpfs /tmp, the version printed, then
#: everything left in the slot and in /tmp (where staticx unpacks) listed.
_SCRIPT = (
    "set -e; mkdir /tmp/slot; cd /tmp/slot; "
    f'"{MOUNT_POINT}/boincvm-wrapper" --version; '
    "echo left:; ls -A /tmp/slot; echo tmp:; ls -A /tmp"
)


def test_frozen_wrapper_runs_on_debian_11(tmp_path: Path) -> None:
    root = build_root()
    assert glibc_version(root) == (2, 31)
    assert not (root / "usr/bin/python3").exists() and not (root / "usr/bin/qemu-system-x86_64").exists()
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copyfile(frozen_wrapper().path, shared / "boincvm-wrapper")
    (shared / "boincvm-wrapper").chmod(0o755)
    done = run_in_root(root, shared, "sh", "-c", _SCRIPT)
    # Nothing left in the slot, and staticx removed its unpacked directory from /tmp.
    assert done.text == f"boincvm-wrapper {__version__}\nleft:\ntmp:\nslot\n", done.stderr
