"""The wrapper's runtime: the launcher's two ways, the first start's unpack, what the runtime holds,
and the library path the wrapper's own children get back.

The launcher runs under dash (Debian's ``/bin/sh``) and busybox ash (a small host's), with
this machine's dynamic loader copied into a runtime-shaped directory, as the app version's is.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from boincvm import proc, unpacked
from boincvm.appversion.frozen import frozen_wrapper
from boincvm.appversion.runtime import LIBRARY_DIRS, LOADER_NAME, write_archive
from boincvm.appversion.wrapper_runtime import INTERNAL, launcher_script, runtime_members
from boincvm.image.elf import needed_libraries
from boincvm.wrapper import self_unpack

SHELLS = [pytest.param(["/bin/sh"], id="dash"), pytest.param(["busybox", "sh"], id="busybox-ash")]
RUNTIME = "boincvm-wrapper-runtime-0123"


def _loader() -> Path:
    return next(d / LOADER_NAME for d in LIBRARY_DIRS if (d / LOADER_NAME).is_file()).resolve()


def _project(tmp_path: Path) -> tuple[Path, Path]:
    """A project directory with the launcher (``main``), a static wrapper that prints what it
    was given, and an archive name; and a slot beside it."""
    project, slot = tmp_path / "projects" / "p", tmp_path / "slots" / "0"
    project.mkdir(parents=True)
    slot.mkdir(parents=True)
    (project / "main").write_bytes(launcher_script(static="static w", archive="rt.tar.xz", unpacked=RUNTIME))
    (project / "static w").write_text(
        '#!/bin/sh\necho "static: $BOINCVM_WRAPPER_RUNTIME"\nfor a in "$@"; do echo "arg: $a"; done\n'
    )
    for name in ("main", "static w"):
        (project / name).chmod(0o755)
    return project, slot


def _unpacked_runtime(project: Path) -> None:
    """A runtime directory as unpack_once leaves it: the loader, and printenv as the program."""
    root = project / RUNTIME
    (root / "lib").mkdir(parents=True)
    (root / "app" / INTERNAL).mkdir(parents=True)
    shutil.copyfile(_loader(), root / "lib" / LOADER_NAME)
    shutil.copyfile(shutil.which("printenv") or "/usr/bin/printenv", root / "app" / "boincvm-wrapper")
    for f in (root / "lib" / LOADER_NAME, root / "app" / "boincvm-wrapper"):
        f.chmod(0o755)
    (root / unpacked.MANIFEST).write_text("{}")


def _launch(shell: list[str], slot: Path, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [*shell, "../../projects/p/main", *args],
        cwd=slot,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_the_launcher_starts_the_static_wrapper_until_the_runtime_is_there(
    tmp_path: Path, shell: list[str]
) -> None:
    project, slot = _project(tmp_path)
    out = _launch(shell, slot, "a b", "", "--nthreads", env={"PATH": os.environ["PATH"]})
    assert out == "static: ../../projects/p/rt.tar.xz\narg: a b\narg: \narg: --nthreads\n"


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("client_path", ["../../projects/p:.:../..", None])
def test_the_launcher_runs_the_runtime_through_its_loader_and_keeps_the_clients_path(
    tmp_path: Path, shell: list[str], client_path: str | None
) -> None:
    project, slot = _project(tmp_path)
    _unpacked_runtime(project)
    env = {"PATH": os.environ["PATH"]} | ({"LD_LIBRARY_PATH": client_path} if client_path is not None else {})
    # printenv, run as the wrapper, prints the environment it was given.
    seen = dict(line.split("=", 1) for line in _launch(shell, slot, env=env).splitlines())
    assert seen["LD_LIBRARY_PATH"] == f"../../projects/p/{RUNTIME}/lib"
    assert seen[proc.HOST_LIBRARY_PATH] == (client_path or "")
    assert proc.WRAPPER_RUNTIME_ENV not in seen  # only the static wrapper unpacks


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"LD_LIBRARY_PATH": "/rt/lib", proc.HOST_LIBRARY_PATH: "../../projects/p:."}, "../../projects/p:."),
        ({"LD_LIBRARY_PATH": "/rt/lib", proc.HOST_LIBRARY_PATH: ""}, None),
        ({"LD_LIBRARY_PATH": "/mei:/host", "LD_LIBRARY_PATH_ORIG": "/host"}, "/host"),
        ({"LD_LIBRARY_PATH": "/mei"}, None),
    ],
)
def test_a_frozen_wrappers_children_get_the_hosts_library_path(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], expected: str | None
) -> None:
    for name in ("LD_LIBRARY_PATH", "LD_LIBRARY_PATH_ORIG", proc.HOST_LIBRARY_PATH):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert proc.child_env(None) is None  # not frozen: the environment as it is
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    env = proc.child_env({"X": "1"})
    assert env is not None and env["X"] == "1"
    assert env.get("LD_LIBRARY_PATH") == expected
    assert "LD_LIBRARY_PATH_ORIG" not in env and proc.HOST_LIBRARY_PATH not in env
    # Through the seam, a real child sees the same.
    seen = proc.run(["printenv", "LD_LIBRARY_PATH"], timeout=30, check=False).text.strip()
    assert seen == (expected or "")


def _archive(tmp_path: Path) -> Path:
    files = tmp_path / "files"
    files.mkdir()
    members = []
    for name in (
        f"{unpacked.WRAPPER_LIB_DIR}/{unpacked.WRAPPER_LOADER}",
        f"{unpacked.WRAPPER_APP_DIR}/boincvm-wrapper",
    ):
        (files / Path(name).name).write_bytes(name.encode())
        members.append((name, files / Path(name).name, 0o755))
    project = tmp_path / "project"
    project.mkdir()
    return write_archive(members, {"format": unpacked.WRAPPER.format}, project / "rt.tar.xz", preset=0)


def test_the_static_wrapper_unpacks_the_runtime_the_launcher_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(proc.WRAPPER_RUNTIME_ENV, raising=False)
    assert self_unpack.start_unpacking() is None  # not named: nothing to do
    archive = _archive(tmp_path)
    monkeypatch.setenv(proc.WRAPPER_RUNTIME_ENV, str(archive))
    caplog.set_level(logging.INFO)
    thread = self_unpack.start_unpacking()
    assert thread is not None
    thread.join(60)
    assert proc.WRAPPER_RUNTIME_ENV not in os.environ  # no child of the wrapper sees it
    root = archive.parent / unpacked.WRAPPER.directory_name(archive)
    assert (root / unpacked.MANIFEST).is_file()
    program = f"{unpacked.WRAPPER_APP_DIR}/{unpacked.WRAPPER_PROGRAM}"
    assert (root / program).read_bytes() == program.encode()
    assert "unpacked the wrapper's runtime" in caplog.text


def test_a_damaged_runtime_costs_only_speed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    archive = _archive(tmp_path)
    archive.write_bytes(archive.read_bytes()[:-40])
    monkeypatch.setenv(proc.WRAPPER_RUNTIME_ENV, str(archive))
    thread = self_unpack.start_unpacking()
    assert thread is not None
    thread.join(60)
    assert "stays packed" in caplog.text and "cannot be unpacked" in caplog.text
    assert [p.name for p in archive.parent.iterdir() if not p.name.startswith(".")] == [archive.name]


def test_the_runtime_holds_every_library_its_programs_load() -> None:
    """Every ELF file of the runtime finds each library it needs inside it (the one-folder
    build's own, or glibc's under lib/), and the loader is there: nothing comes from the host."""
    onedir = frozen_wrapper().onedir
    members = runtime_members(onedir)
    names = [n for n, _, _ in members]
    assert len(names) == len(set(names))
    assert f"{unpacked.WRAPPER_LIB_DIR}/{unpacked.WRAPPER_LOADER}" in names
    assert f"{unpacked.WRAPPER_APP_DIR}/{unpacked.WRAPPER_PROGRAM}" in names
    provided = {Path(n).name for n in names if n.startswith(f"{unpacked.WRAPPER_LIB_DIR}/")}
    provided |= {p.name for p in (onedir / INTERNAL).iterdir()}
    assert "libc.so.6" in provided
    for _name, path, mode in members:
        if path.read_bytes()[:4] == b"\x7fELF":
            assert mode == 0o755
            missing = [lib for lib in needed_libraries(path) if lib not in provided]
            assert not missing, (path, missing)
