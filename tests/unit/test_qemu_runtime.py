"""The bundled QEMU runtime: what the builder collects, the archive, and the unpack-once logic."""

from __future__ import annotations

import hashlib
import multiprocessing
import subprocess
import tarfile
from pathlib import Path

import pytest

from boincvm.appversion.runtime import FIRMWARE, MODULES, RuntimeFiles, collect_runtime, write_runtime_archive
from boincvm.errors import ToolError
from boincvm.hypervisor.qemu.runtime import (
    MANIFEST,
    PATH_QEMU,
    PREFIX,
    QemuTools,
    RuntimeArchiveError,
    archive_digest,
    archive_problem,
    unpack_once,
)


@pytest.fixture(scope="module")
def files() -> RuntimeFiles:
    return collect_runtime()


def _small(files: RuntimeFiles) -> RuntimeFiles:
    """The real programs, loader and libraries, but only one firmware file: a quick archive
    (xz of the whole runtime takes most of a minute on this machine)."""
    return RuntimeFiles(
        programs=files.programs,
        loader=files.loader,
        libraries=files.libraries,
        modules=(),
        firmware=files.firmware[:1],
        qemu_version=files.qemu_version,
    )


@pytest.fixture(scope="module")
def archive(files: RuntimeFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_runtime_archive(
        _small(files), tmp_path_factory.mktemp("rt") / "qemu-runtime.tar.xz", preset=0
    )


def test_collect_lists_programs_loader_libraries_modules_and_firmware(files: RuntimeFiles) -> None:
    names = [n for n, _ in files.members()]
    assert [n for n, _ in files.programs] == ["bin/qemu-system-x86_64", "bin/qemu-img"]
    assert files.loader[0] == "lib/ld-linux-x86-64.so.2" and files.loader[1].is_file()
    libs = {n.removeprefix("lib/") for n, _ in files.libraries}
    assert {"libc.so.6", "libglib-2.0.so.0", "libz.so.1"} <= libs
    assert "ld-linux-x86-64.so.2" not in libs  # the loader is listed once, as the loader
    # Every library ldd reports for both programs is in the bundle.
    for _, prog in files.programs:
        out = subprocess.run(["ldd", str(prog)], capture_output=True, text=True, check=True).stdout
        sonames = {line.split()[0] for line in out.splitlines() if "=>" in line}
        assert sonames <= libs, sonames - libs
    assert [n for n, _ in files.modules] == [f"modules/{m}" for m in MODULES]
    assert [n for n, _ in files.firmware] == [f"share/{f}" for f in FIRMWARE]
    assert all(p.is_file() for _, p in files.members())
    assert len(names) == len(set(names))
    assert files.qemu_version.startswith("QEMU emulator version ")


def test_archive_is_reproducible_and_has_a_manifest(
    files: RuntimeFiles, archive: Path, tmp_path: Path
) -> None:
    again = write_runtime_archive(_small(files), tmp_path / "again.tar.xz", preset=0)
    assert archive_digest(again) == archive_digest(archive)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    assert members[0].name == MANIFEST
    assert {m.mtime for m in members} == {0} and {m.uid for m in members} == {0}
    assert [m.name for m in members[1:]] == sorted(m.name for m in members[1:])
    assert not list(tmp_path.glob(".*"))  # no .part left behind


def test_unpack_once_then_reuse(archive: Path, tmp_path: Path) -> None:
    rt = unpack_once(archive, tmp_path)
    assert rt.root.name == PREFIX + archive_digest(archive)[:32]
    stamp = (rt.root / MANIFEST).stat().st_mtime_ns
    assert unpack_once(archive, tmp_path).root == rt.root
    assert (rt.root / MANIFEST).stat().st_mtime_ns == stamp  # not unpacked again
    done = subprocess.run(
        [*rt.command("qemu-img"), "--version"], capture_output=True, text=True, env={}, check=False
    )
    assert done.returncode == 0 and done.stdout.startswith("qemu-img version"), done.stderr
    assert rt.env == {"QEMU_MODULE_DIR": str(rt.root / "modules")}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([rt.root.name, f".{rt.root.name}.lock"])


def _unpack_in_child(archive: str, parent: str, queue: multiprocessing.Queue[str]) -> None:
    queue.put(str(unpack_once(Path(archive), Path(parent)).root))


def test_two_starts_at_once_unpack_once(archive: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[str] = ctx.Queue()
    procs = [
        ctx.Process(target=_unpack_in_child, args=(str(archive), str(tmp_path), queue)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    roots = {queue.get(timeout=10), queue.get(timeout=10)}
    assert len(roots) == 1
    # One directory and the lock: no temp directory of a second extraction is left.
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1


def test_kill_mid_unpack_leftover_is_removed(archive: Path, tmp_path: Path) -> None:
    name = PREFIX + archive_digest(archive)[:32]
    leftover = tmp_path / f".{name}.tmp-killed"
    (leftover / "lib").mkdir(parents=True)
    (leftover / "lib" / "half-written.so").write_bytes(b"\x7fELF")
    rt = unpack_once(archive, tmp_path)
    assert not leftover.exists()
    assert rt.root == tmp_path / name


def test_corrupt_archive_is_a_clear_error(archive: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.xz"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = b"\0" * 4096
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeArchiveError, match="cannot be unpacked") as exc:
        unpack_once(bad, out)
    assert exc.value.exit_code != 0 and "reinstall" in exc.value.hint
    assert [p.name for p in out.iterdir()] == [f".{PREFIX}{archive_digest(bad)[:32]}.lock"]


def test_archive_without_manifest_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.tar.xz"
    with tarfile.open(plain, "w:xz") as tar:
        (tmp_path / "x").write_text("x")
        tar.add(tmp_path / "x", arcname="x")
    with pytest.raises(RuntimeArchiveError, match=MANIFEST):
        unpack_once(plain, tmp_path)
    assert hashlib.sha256(plain.read_bytes()).hexdigest()  # the archive itself is left alone


def test_archive_problem_reads_without_extracting(archive: Path, tmp_path: Path) -> None:
    assert archive_problem(archive) is None
    bad = tmp_path / "bad.tar.xz"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = b"\0" * 4096
    bad.write_bytes(bytes(data))
    assert "cannot be read" in (archive_problem(bad) or "")
    plain = tmp_path / "plain.tar.xz"
    with tarfile.open(plain, "w:xz") as tar:
        tar.add(archive, arcname="x")
    assert MANIFEST in (archive_problem(plain) or "")


def test_selected_runtime_gives_loader_commands(archive: Path, tmp_path: Path) -> None:
    rt = unpack_once(archive, tmp_path)
    assert PATH_QEMU.system_command() == ["qemu-system-x86_64"] and PATH_QEMU.env is None
    tools = QemuTools(rt)
    loader = str(rt.root / "lib/ld-linux-x86-64.so.2")
    assert tools.system_command()[:4] == [
        loader,
        "--library-path",
        str(rt.root / "lib"),
        str(rt.root / "bin/qemu-system-x86_64"),
    ]
    assert tools.system_command()[4:] == ["-L", str(rt.root / "share")]
    assert tools.img_command()[0] == loader and tools.img_command()[-1].endswith("bin/qemu-img")
    assert tools.binary() == rt.root / "bin/qemu-system-x86_64"


def test_unwritable_parent_is_a_clear_error(archive: Path, tmp_path: Path) -> None:
    missing = tmp_path / "gone"  # a parent that is not there stands for one the user cannot write
    with pytest.raises(ToolError, match="cannot be unpacked in") as exc:
        unpack_once(archive, missing)
    assert "writable" in exc.value.hint
