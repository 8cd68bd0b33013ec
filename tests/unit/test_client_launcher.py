"""ClientLauncher: how the real client is started, on this host or inside another root."""

from __future__ import annotations

from pathlib import Path

import pytest

from boincvm.runlocal.real_client import HOST, ClientLauncher


def test_the_host_launcher_runs_boinc_with_the_data_dir_as_it_is(tmp_path: Path) -> None:
    assert HOST.argv("--dir", "x") == ["boinc", "--dir", "x"]
    assert HOST.inside(tmp_path / "data") == (tmp_path / "data").resolve()


def test_a_launcher_in_another_root_names_the_data_dir_from_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    launcher = ClientLauncher(prefix=("chroot", str(root)), root=root)
    assert launcher.inside(root / "var/lib/boinc") == Path("/var/lib/boinc")
    argv = launcher.argv("--dir", "/var/lib/boinc")
    assert argv == ["chroot", str(root), "boinc", "--dir", "/var/lib/boinc"]


def test_a_data_dir_outside_the_root_is_refused(tmp_path: Path) -> None:
    launcher = ClientLauncher(prefix=("chroot", str(tmp_path / "root")), root=tmp_path / "root")
    with pytest.raises(ValueError):
        launcher.inside(tmp_path / "elsewhere")
