"""RAM-diff checkpoints (boincvm.hypervisor.qemu.ramdiff) against real processes that map a
file privately, as QEMU maps the golden RAM: the page map, /proc/PID/mem both ways, the
file format and its damage."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.errors import HypervisorError
from boincvm.hypervisor.qemu import ramdiff

PAGE = ramdiff.PAGE
PAGES = 64

#: Maps the file privately, writes the pages named on the command line (``N=byte``), says
#: where the mapping is, and on each line from stdin prints the sha256 of the mapping.
CHILD = textwrap.dedent(
    """
    import hashlib, mmap, sys
    f = open(sys.argv[1], "r+b")
    m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    for spec in sys.argv[2:]:
        page, byte = (int(x) for x in spec.split("="))
        m[page * 4096:(page + 1) * 4096] = bytes([byte]) * 4096
    m[0:1]  # touch one page read-only: it stays the file's
    print("ready", flush=True)
    for _ in sys.stdin:
        print(hashlib.sha256(m[:]).hexdigest(), flush=True)
    """
)


class Child:
    def __init__(self, ram: Path, writes: dict[int, int]) -> None:
        args = [f"{p}={b}" for p, b in writes.items()]
        self.p = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(ram), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.p.stdout is not None
        assert self.p.stdout.readline().strip() == "ready"

    @property
    def pid(self) -> int:
        return self.p.pid

    def digest(self) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write("\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self) -> None:
        self.p.kill()
        self.p.wait(10)


@pytest.fixture
def ram(tmp_path: Path) -> Path:
    """A 'golden RAM' file: page i holds byte i+1, except the last 8 pages, which are a hole."""
    path = tmp_path / "golden.ram"
    with path.open("wb") as f:
        for i in range(PAGES - 8):
            f.write(bytes([i + 1]) * PAGE)
        f.truncate(PAGES * PAGE)
    return path


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for c in made:
        c.close()


def expected(ram: Path, writes: dict[int, int]) -> str:
    data = bytearray(ram.read_bytes())
    for page, byte in writes.items():
        data[page * PAGE : (page + 1) * PAGE] = bytes([byte]) * PAGE
    return hashlib.sha256(bytes(data)).hexdigest()


def entry(
    present: bool = False, swapped: bool = False, file: bool = False, soft_dirty: bool = False
) -> bytes:
    v = (present << 63) | (swapped << 62) | (file << 61) | (soft_dirty << 55) | 0x1234
    return struct.pack("<Q", v)


def test_own_runs_are_the_written_or_swapped_pages_not_the_files_or_absent_ones() -> None:
    table = b"".join(
        [
            entry(),  # 0 never touched
            entry(present=True, file=True),  # 1 read: the file's page
            entry(present=True),  # 2 written: private copy
            entry(present=True),  # 3
            entry(swapped=True),  # 4 a private copy, swapped out
            entry(soft_dirty=True),  # 5 absent (only the soft-dirty flag)
            entry(present=True, file=True, soft_dirty=True),  # 6
            entry(present=True),  # 7
        ]
    )
    assert list(ramdiff.own_runs(table)) == [(2, 5), (7, 8)]
    assert list(ramdiff.own_runs(b"")) == []


@pytest.mark.parametrize("scan", [True, False], ids=["pagemap-scan", "pagemap-read"])
def test_save_then_load_reproduces_the_guest_ram_in_another_process(
    ram: Path, tmp_path: Path, children: list[Child], monkeypatch: pytest.MonkeyPatch, scan: bool
) -> None:
    """Both ways of finding the guest's pages: the kernel's filter and the whole page map."""
    monkeypatch.setattr(ramdiff, "use_scan", scan)
    # Written pages: data, a page rewritten with zeros, pages in the hole, a run of three.
    writes = {3: 0xAA, 4: 0xAB, 5: 0xAC, 10: 0, 40: 7, PAGES - 2: 0x55, PAGES - 1: 0}
    source = Child(ram, writes)
    children.append(source)
    assert source.digest() == expected(ram, writes)
    out = tmp_path / "ram.diff"
    saved = ramdiff.save_ram(source.pid, ram, out)
    assert saved.pages == len(writes)
    assert saved.zero_pages == 2
    assert saved.data_bytes == 5 * PAGE

    target = Child(ram, {})
    children.append(target)
    assert target.digest() == expected(ram, {})
    ramdiff.load_ram(target.pid, ram, out, PAGES * PAGE)
    assert target.digest() == expected(ram, writes)
    # The restored pages are the target's own now; the file never changed.
    again = ramdiff.save_ram(target.pid, ram, tmp_path / "again.diff")
    assert again.pages == len(writes)
    assert ram.read_bytes()[3 * PAGE] == 4


def test_a_process_that_does_not_map_the_file_is_refused(
    ram: Path, tmp_path: Path, children: list[Child]
) -> None:
    other = tmp_path / "other.ram"
    other.write_bytes(bytes(PAGE * 4))
    child = Child(other, {1: 1})
    children.append(child)
    with pytest.raises(HypervisorError, match="does not map"):
        ramdiff.save_ram(child.pid, ram, tmp_path / "x")


@pytest.mark.parametrize(
    "damage",
    ["truncated", "no-footer", "table-count", "bad-magic", "empty"],
)
def test_a_damaged_ram_diff_is_refused_before_anything_is_written(
    ram: Path, tmp_path: Path, children: list[Child], damage: str
) -> None:
    source = Child(ram, {2: 9, 3: 0})
    children.append(source)
    out = tmp_path / "ram.diff"
    ramdiff.save_ram(source.pid, ram, out)
    data = bytearray(out.read_bytes())
    if damage == "truncated":
        data = data[PAGE // 2 :]
    elif damage == "no-footer":
        data = data[:-8]
    elif damage == "table-count":
        data[-16:-8] = struct.pack("<Q", 99)
    elif damage == "bad-magic":
        data[-32] ^= 0xFF
    else:
        data = bytearray()
    out.write_bytes(bytes(data))
    target = Child(ram, {})
    children.append(target)
    before = target.digest()
    with pytest.raises(HypervisorError):
        ramdiff.load_ram(target.pid, ram, out, PAGES * PAGE)
    assert target.digest() == before


def test_a_diff_naming_pages_beyond_the_mapping_is_refused(
    ram: Path, tmp_path: Path, children: list[Child]
) -> None:
    # A well-formed file whose one run lies past the end of the RAM.
    out = tmp_path / "ram.diff"
    page = b"\x01" * PAGE
    table = struct.pack("<QQQ", PAGES + 5, 1, 0)
    out.write_bytes(page + table + struct.pack("<16sQQ", b"BOINCVM-RAMDIFF1", 1, PAGE))
    target = Child(ram, {})
    children.append(target)
    with pytest.raises(HypervisorError, match="outside"):
        ramdiff.load_ram(target.pid, ram, out, PAGES * PAGE)


def _manifest(ram: Path, tmp: Path) -> ramdiff.Manifest:
    (tmp / ramdiff.RAM_FILE).write_bytes(b"ram")
    (tmp / ramdiff.DEVICES_FILE).write_bytes(b"devices")
    return ramdiff.Manifest(
        ram,
        PAGES * PAGE,
        hashlib.sha256(b"ram").hexdigest(),
        hashlib.sha256(b"devices").hexdigest(),
        ramdiff.Saved(1, 0, 3),
    )


def test_a_checkpoint_directory_appears_whole_and_its_digests_are_checked(ram: Path, tmp_path: Path) -> None:
    target = ramdiff.checkpoint_dir(tmp_path, "ck1")
    m = ramdiff.write(target, lambda tmp: _manifest(ram, tmp))
    assert ramdiff.names(tmp_path) == ["ck1"]
    assert ramdiff.read_manifest(target, verify=True) == m
    assert ramdiff.size(target) > len(b"ramdevices")
    (target / ramdiff.DEVICES_FILE).write_bytes(b"devicez")
    with pytest.raises(HypervisorError, match="devices.mig does not match its digest"):
        ramdiff.read_manifest(target, verify=True)
    ramdiff.remove(target)
    assert not target.exists() and ramdiff.names(tmp_path) == []
    assert list((tmp_path / ramdiff.CHECKPOINTS).iterdir()) == []


def test_a_checkpoint_that_fails_while_being_built_leaves_nothing(ram: Path, tmp_path: Path) -> None:
    def failing(tmp: Path) -> ramdiff.Manifest:
        _manifest(ram, tmp)
        raise HypervisorError("qemu: the guest went away")

    with pytest.raises(HypervisorError):
        ramdiff.write(ramdiff.checkpoint_dir(tmp_path, "ck"), failing)
    assert list((tmp_path / ramdiff.CHECKPOINTS).iterdir()) == []
    assert ramdiff.names(tmp_path) == []


@pytest.mark.parametrize(
    "manifest",
    ["", "[]", "{}", '{"format": 2}', '{"format": 1, "golden_ram": "x"}', "{" * 5],
)
def test_a_malformed_manifest_is_one_clear_error(tmp_path: Path, manifest: str) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    (d / ramdiff.MANIFEST).write_text(manifest)
    with pytest.raises(HypervisorError, match="checkpoint ck"):
        ramdiff.read_manifest(d, verify=False)


def test_the_manifest_records_what_the_checkpoint_applies_to(ram: Path, tmp_path: Path) -> None:
    target = ramdiff.checkpoint_dir(tmp_path, "ck")
    ramdiff.write(target, lambda tmp: _manifest(ram, tmp))
    raw = json.loads((target / ramdiff.MANIFEST).read_text())
    assert (
        raw["golden_ram"] == str(ram) and raw["ram_bytes"] == PAGES * PAGE and raw["format"] == ramdiff.FORMAT
    )


def test_the_kernel_filter_and_the_whole_page_map_find_the_same_pages(
    ram: Path, children: list[Child]
) -> None:
    child = Child(ram, {0: 1, 1: 2, 7: 3, 30: 0, 31: 4, PAGES - 1: 5})
    children.append(child)
    (vma,) = ramdiff.ram_vmas(child.pid, ram)
    fd = os.open(f"/proc/{child.pid}/pagemap", os.O_RDONLY)
    try:
        scanned = ramdiff._scan(fd, vma)
        ramdiff.use_scan = False
        try:
            read = list(ramdiff._own_pages(fd, vma))
        finally:
            ramdiff.use_scan = True
    finally:
        os.close(fd)
    assert read == [(0, 2), (7, 8), (30, 32), (PAGES - 1, PAGES)]
    if scanned is not None:  # Linux 6.7 and later
        assert [((a - vma.start) // PAGE, (b - vma.start) // PAGE) for a, b in scanned] == read


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 200, "a\nb"])
def test_a_checkpoint_name_never_names_a_path_elsewhere(tmp_path: Path, name: str) -> None:
    with pytest.raises(HypervisorError, match="not a checkpoint name"):
        ramdiff.checkpoint_dir(tmp_path, name)
