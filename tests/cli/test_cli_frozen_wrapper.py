"""The app version's main program: a frozen ELF by default, a zip application on request."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from boincvm import __version__, unpacked
from boincvm.appversion.frozen import NAME, ONEDIR, freeze, frozen_wrapper
from boincvm.appversion.model import STATIC_WRAPPER_TAIL, WRAPPER_RUNTIME_OPEN_NAME, parse_version_xml
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


def _versions_without_python(program: Path, slot: Path, tmp_path: Path) -> None:
    """``program --version`` prints the version line with a PATH without python, and with none."""
    no_python = tmp_path / "bin"  # a PATH with programs, none of them python
    no_python.mkdir(exist_ok=True)
    if not (no_python / "true").exists():
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


def test_package_image_ships_a_launcher_the_static_elf_and_the_wrappers_runtime(
    tmp_path: Path, run: RunFn
) -> None:
    av, program = _package(tmp_path, run)
    assert program.name.startswith("hello_1.00_") and program.name.endswith("_boincvm-wrapper")
    assert program.read_bytes().startswith(b"#!/bin/sh\n")
    assert program.stat().st_mode & 0o111
    vx, _ = parse_version_xml((av / "version.xml").read_bytes())
    (static,) = [f.physical_name for f in vx.files if f.physical_name.endswith(f"_{STATIC_WRAPPER_TAIL}")]
    (archive,) = [f.physical_name for f in vx.files if f.logical_name == WRAPPER_RUNTIME_OPEN_NAME]
    assert (av / static).read_bytes()[:4] == b"\x7fELF" and (av / static).stat().st_mode & 0o111
    assert unpacked.archive_problem(av / archive, unpacked.WRAPPER) is None
    # As the client lays it out: the app version's files in the project directory, the
    # main program run by its path from a slot beside it.
    project, slot = tmp_path / "projects" / "p", tmp_path / "slots" / "0"
    shutil.copytree(av, project)
    slot.mkdir(parents=True)
    launcher = Path("../../projects/p") / program.name
    # Before the runtime is unpacked: the static wrapper answers.
    _versions_without_python(launcher, slot, tmp_path)
    root, _ = unpacked.unpack_once(project / archive, unpacked.WRAPPER)
    assert root.parent == project
    # Then the runtime does, through its own loader: without the static wrapper, nothing else could.
    (project / static).unlink()
    _versions_without_python(launcher, slot, tmp_path)
    # validate knows the launcher of these files from any other main program.
    program.write_bytes(program.read_bytes().replace(b"--library-path", b"--library-path /x:"))
    code, _, err = run(["validate", str(av)])
    assert code != 0 and f"the main program {program.name} is not the launcher of {static}" in err, err
    shipped = {p.name for p in av.iterdir()}
    assert sorted(p.name for p in project.iterdir() if p.name not in shipped) == [
        f".{root.name}.lock",
        root.name,
    ]


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
        dist = tmp_path / name / "dist"
        one_folder = sorted(p for p in (dist / ONEDIR).rglob("*") if p.is_file())
        digests.append(
            [hashlib.sha256(p.read_bytes()).hexdigest() for p in [dist / NAME, *one_folder]]
            + [p.relative_to(dist).as_posix() for p in one_folder]
        )
    assert digests[0] == digests[1]
    assert frozen_wrapper().path.read_bytes()[:4] == b"\x7fELF"
