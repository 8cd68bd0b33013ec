"""The bundled QEMU runtime end to end: package-image ships it, run-local's wrapper unpacks it
once into the project directory and runs it, with no QEMU on PATH at all."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from boincvm.appversion.build import package_image
from boincvm.appversion.model import RUNTIME_OPEN_NAME, AppVersionRequest, RuntimeKind, parse_version_xml
from boincvm.hypervisor.qemu.runtime import MANIFEST, PREFIX
from boincvm.job import OutputFile
from boincvm.runlocal.request import LiveState
from boincvm.validate import validate_path
from boincvm.workunit.make import InputSpec
from tests.integration.test_run_local import make_wu, qemu_pids_under, run

pytestmark = pytest.mark.integration


def _path_without_qemu(tmp_path: Path) -> str:
    """A PATH directory linking every program of /usr/bin and /bin except QEMU's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in (Path("/usr/sbin"), Path("/usr/bin"), Path("/bin"), Path("/sbin")):
        if not d.is_dir():
            continue
        for prog in d.iterdir():
            if prog.name.startswith("qemu") or (bin_dir / prog.name).exists():
                continue
            (bin_dir / prog.name).symlink_to(prog)
    return str(bin_dir)


def _exe_of(pid: int) -> tuple[str, list[str]]:
    proc_dir = Path(f"/proc/{pid}")
    return str((proc_dir / "exe").readlink()), (proc_dir / "cmdline").read_bytes().decode().split("\0")


def test_bundled_runtime_runs_without_qemu_on_path(
    guest_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    av = tmp_path / "av"
    package_image(
        AppVersionRequest(
            image=guest_image, app_name="itest", version="1.00", output_dir=av, runtime=RuntimeKind.BUNDLED
        )
    )
    vx, findings = parse_version_xml((av / "version.xml").read_bytes())
    assert not findings
    (rt_file,) = [f for f in vx.files if f.logical_name == RUNTIME_OPEN_NAME]
    report = validate_path(av)
    assert report.ok, report

    monkeypatch.setenv("PATH", _path_without_qemu(tmp_path))
    assert not any(Path(d, "qemu-system-x86_64").exists() for d in os.environ["PATH"].split(os.pathsep))
    data_dir = tmp_path / "client"
    data_dir.mkdir()
    exes: set[tuple[str, str]] = set()

    def watch(_state: LiveState) -> None:
        for pid in qemu_pids_under(data_dir):
            try:
                exe, argv = _exe_of(pid)
            except OSError:
                continue
            exes.add((exe, argv[3] if len(argv) > 3 else ""))

    (tmp_path / "world.txt").write_text("world\n")
    wu = make_wu(
        tmp_path,
        '-c "sleep 2; tr a-z A-Z < in > out"',
        inputs=(InputSpec("in", str(tmp_path / "world.txt")),),
        outputs=(OutputFile("out", 100_000),),
    )
    t0 = time.monotonic()
    summary = run(wu, av, data_dir, tmp_path, on_update=watch)
    first = time.monotonic() - t0
    assert summary.ok, summary.message + summary.stderr_tail
    assert (tmp_path / "results/out").read_text() == "WORLD\n"

    # Unpacked once, in the project directory (outside the slot), named by content.
    (project,) = (data_dir / "projects").iterdir()
    (unpacked,) = [p for p in project.iterdir() if p.name.startswith(PREFIX)]
    assert (unpacked / MANIFEST).is_file()
    assert (project / rt_file.physical_name).is_file()
    assert not [p for p in project.iterdir() if ".tmp-" in p.name]
    # The QEMU that ran was the bundled one, through the bundled loader.
    assert exes, "no QEMU process was seen during the run"
    for exe, prog in exes:
        assert Path(exe).resolve() == (unpacked / "lib/ld-linux-x86-64.so.2").resolve(), exe
        assert Path(prog).resolve() == (unpacked / "bin/qemu-system-x86_64").resolve(), prog

    # A second task of the same app version reuses the directory: nothing is unpacked again.
    stamp = (unpacked / MANIFEST).stat().st_mtime_ns
    (tmp_path / "results").rename(tmp_path / "results-1")
    t0 = time.monotonic()
    summary = run(wu, av, data_dir, tmp_path)
    second = time.monotonic() - t0
    assert summary.ok, summary.message + summary.stderr_tail
    assert (unpacked / MANIFEST).stat().st_mtime_ns == stamp
    print(f"run-local with the bundled runtime: first {first:.1f} s, second {second:.1f} s")
