"""The app version's main program: a frozen ELF by default, a zip application on request."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from boincvm import __version__
from boincvm.appversion.frozen import NAME, freeze, frozen_wrapper
from boincvm.appversion.model import parse_version_xml
from boincvm.wrapper.main import main
from tests.cli.conftest import RunFn

VERSION_LINE = f"boincvm-wrapper {__version__}\n"


def _package(tmp_path: Path, run: RunFn, *extra: str) -> tuple[Path, Path]:
    """A tiny disk image packaged; returns (app version directory, its main program)."""
    img = tmp_path / "base.img"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(img), "16M"], check=True, capture_output=True)
    av = tmp_path / "av"
    code, out, err = run(["package-image", str(img), "--app", "hello", "-o", str(av), "--json", *extra])
    assert code == 0, err
    vx, findings = parse_version_xml((av / "version.xml").read_bytes())
    assert not findings
    (main_program,) = [f for f in vx.files if f.main_program]
    summary = json.loads(out)
    assert [f["physical_name"] for f in summary["files"] if f["main_program"]] == [main_program.physical_name]
    assert main_program.logical_name is None  # the client runs it by its path, as BOINC does
    code, _, err = run(["validate", str(av)])
    assert code == 0, err
    return av, av / main_program.physical_name


def _version(program: Path, cwd: Path, env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(program), "--version"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_package_image_ships_a_frozen_elf_that_needs_no_python(tmp_path: Path, run: RunFn) -> None:
    av, program = _package(tmp_path, run)
    assert program.name.startswith("hello_1.00_") and program.name.endswith("_boincvm-wrapper")
    assert program.read_bytes()[:4] == b"\x7fELF"
    assert program.stat().st_mode & 0o111
    slot = tmp_path / "slot"
    slot.mkdir()
    no_python = tmp_path / "bin"  # a PATH with programs, none of them python
    no_python.mkdir()
    (no_python / "true").symlink_to("/bin/true")
    for env in ({"PATH": str(no_python)}, {}):
        done = _version(program, slot, env)
        assert (done.returncode, done.stdout) == (0, VERSION_LINE), done.stderr
    # env -i: the empty environment the check above also used, through env(1) itself.
    done = subprocess.run(
        ["env", "-i", str(program), "--version"], cwd=slot, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, VERSION_LINE), done.stderr
    assert list(slot.iterdir()) == []  # --version leaves the slot as it was


def test_package_image_wrapper_pyz_keeps_the_zip_application(tmp_path: Path, run: RunFn) -> None:
    _, program = _package(tmp_path, run, "--wrapper", "pyz")
    assert program.name.endswith("_wrapper.pyz")
    assert program.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    slot = tmp_path / "slot"
    slot.mkdir()
    done = subprocess.run(
        [sys.executable, str(program), "--version"], cwd=slot, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, VERSION_LINE), done.stderr
    assert list(slot.iterdir()) == []


def test_frozen_wrapper_refuses_other_platforms(tmp_path: Path, run: RunFn) -> None:
    img = tmp_path / "base.img"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(img), "16M"], check=True, capture_output=True)
    out = str(tmp_path / "av")
    args = ["package-image", str(img), "--app", "a", "--platform", "windows_x86_64", "-o", out]
    code, _, err = run(args)
    assert code == 3 and "--wrapper pyz" in err and "Traceback" not in err
    code, _, err = run([*args, "--wrapper", "pyz"])
    assert code == 0, err


def test_version_touches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == VERSION_LINE
    assert list(tmp_path.iterdir()) == []


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    """Other build directories, other times: the PyInstaller stage gives the same bytes.

    staticx's stage does not: its archive of the host's libraries records the time it
    copied them, so the final executable differs from build to build (the cache keeps one).
    """
    # Digests, not bytes: a failing comparison of two 10 MB byte strings is not worth a diff.
    digests = []
    for name in ("a", "b"):
        static = freeze(tmp_path / name)
        assert static.read_bytes()[:4] == b"\x7fELF"
        digests.append(hashlib.sha256((tmp_path / name / "dist" / NAME).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert frozen_wrapper().path.read_bytes()[:4] == b"\x7fELF"
