"""``boincvm guest-api DIR``: the guest API's files, written whole, cached, refused cleanly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from boincvm.guestapi import WRITTEN
from tests.cli.conftest import RunFn

# gcc is installed by scripts/bootstrap.sh: these tests always run.

EXPECTED = sorted(WRITTEN)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private boincvm cache, so the first run compiles the library for real."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_writes_the_api_and_caches_the_library(run: RunFn, tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "api"
    code, stdout, _ = run(["guest-api", str(out), "--json"])
    assert code == 0
    listing = json.loads(stdout)
    assert listing["files"] == EXPECTED
    assert listing["library_cached"] is False
    assert sorted(p.name for p in out.iterdir()) == EXPECTED
    assert (out / "boinc").stat().st_mode & 0o111
    assert (out / "libboinc_api.a").read_bytes().startswith(b"!<arch>\n")
    members = subprocess.run(
        ["ar", "t", str(out / "libboinc_api.a")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert members == ["boinc_api.o"]
    # No half-written sibling is left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api", "cache"]

    # A second run into another directory takes the library from the cache, same bytes.
    again = tmp_path / "api2"
    code, stdout, _ = run(["guest-api", str(again), "--json"])
    assert code == 0
    assert json.loads(stdout)["library_cached"] is True
    for name in EXPECTED:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_rerun_on_its_own_output_is_idempotent(run: RunFn, tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "api"
    assert run(["guest-api", str(out)])[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "boinc.py").write_text("# edited by hand\n")
    code, stdout, stderr = run(["guest-api", str(out)])
    assert code == 0
    assert "wrote 6 files" in stdout + stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_refuses_a_directory_with_other_files(run: RunFn, tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    code, _, stderr = run(["guest-api", str(out)])
    assert code == 3
    assert "notes.txt" in stderr and "--force" in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    code, _, _ = run(["guest-api", str(out), "--force"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == EXPECTED


def test_refuses_a_file(run: RunFn, tmp_path: Path, cache: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("x\n")
    code, _, stderr = run(["guest-api", str(target)])
    assert code == 2  # click's usage error: DIRECTORY must be a directory
    assert "is a file" in stderr
    assert target.read_text() == "x\n"


def test_missing_gcc_is_a_tool_error(
    run: RunFn, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    out = tmp_path / "api"
    code, _, stderr = run(["guest-api", str(out)])
    assert code == 5
    assert "apt-get install gcc" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
