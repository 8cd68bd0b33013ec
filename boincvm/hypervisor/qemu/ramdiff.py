"""Checkpoints that hold what the guest wrote, not its whole RAM.

A VM started from a golden checkpoint maps ``golden.ram`` privately (:mod:`.golden`):
the kernel gives each page the guest writes a private anonymous copy, and every other
page is still the file's. ``/proc/PID/pagemap`` says which is which, so the pages that
can differ from the golden RAM are known without any help from QEMU. A checkpoint is
then, with the guest stopped:

* the disk: a qcow2 internal snapshot without memory (``blockdev-snapshot-internal-sync``);
* the devices: ``xen-save-devices-state``, a migration stream without RAM;
* the RAM: the written pages, read through ``/proc/PID/mem``, all-zero pages as runs
  without data (guests booted with ``init_on_free=1`` zero what they free).

A restore starts QEMU with ``-incoming defer`` on the same ``golden.ram``, writes the
pages back through ``/proc/PID/mem`` before any guest code runs, and loads the device
stream as an incoming migration. Save and restore cost what the guest wrote since its
golden boot; the size of its RAM only adds the kernel's walk of the page tables (filtered in
the kernel with ``PAGEMAP_SCAN`` since Linux 6.7, else 8 bytes of page map per 4 KiB page).

RAM blocks other than the guest's main memory (the BIOS, option ROM and ACPI blobs
QEMU hands the firmware at boot) are in neither stream: a restored VM has them empty.
A Linux guest reads them only while it boots, and ``-no-reboot`` ends the VM where it
would boot again.

One checkpoint is a directory ``checkpoints/<name>/`` in the VM's work directory,
built under a temporary name, its files fsynced, then renamed into place: it exists
whole or not at all. Its ``manifest.json`` names the golden RAM it applies to and the
sha256 of its two files, checked before a restore.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from boincvm.atomicdir import fsync_path
from boincvm.errors import HypervisorError
from boincvm.hashing import sha256_file

PAGE = 4096
CHECKPOINTS = "checkpoints"
RAM_FILE = "ram.diff"
DEVICES_FILE = "devices.mig"
MANIFEST = "manifest.json"
FORMAT = 1
_MAGIC = b"BOINCVM-RAMDIFF1"
#: A run of pages in ``ram.diff``: first page, page count, flags (``_ZERO``: no data follows).
_RUN = struct.Struct("<QQQ")
_FOOTER = struct.Struct("<16sQQ")  # magic, run count, offset of the run table
_ZERO = 1
#: Runs are read from QEMU in pieces of at most this many bytes.
_CHUNK = 8 << 20
_ZERO_PAGE = bytes(PAGE)
# The pagemap entry's top byte: bit 7 present, 6 swapped, 5 file page or shared.
# A page is the guest's own when it is swapped, or present and not the file's.
_OWN = bytes(1 if (b & 0x40) or (b & 0xA0) == 0x80 else 0 for b in range(256))
_OWN_RUN = re.compile(b"\x01+")
# PAGEMAP_SCAN (Linux 6.7): _IOWR('f', 16, struct pm_scan_arg), 12 u64 fields; its page
# categories; a page region is three u64 (start, end, categories).
_SCAN_ARG = struct.Struct("<12Q")
_PAGEMAP_SCAN = (3 << 30) | (_SCAN_ARG.size << 16) | (ord("f") << 8) | 16
_IS_FILE, _IS_PRESENT, _IS_SWAPPED = 1 << 2, 1 << 3, 1 << 4
_SCAN_REGIONS = 4096
#: Ask the kernel to filter the page map (False: read all of it, as before Linux 6.7).
use_scan = True


@dataclass(frozen=True)
class Vma:
    """Part of the RAM file's mapping in QEMU: ``start``-``end`` maps the file from ``offset``."""

    start: int
    end: int
    offset: int


@dataclass(frozen=True)
class Saved:
    """What one checkpoint wrote."""

    pages: int
    zero_pages: int
    data_bytes: int


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def checkpoint_dir(workdir: Path, name: str) -> Path:
    """Where checkpoint ``name`` of the VM in ``workdir`` lives.

    Raises:
        HypervisorError: ``name`` is not a plain file name (it would name a path elsewhere).
    """
    if not _NAME.fullmatch(name):
        raise HypervisorError(f"qemu: {name!r} is not a checkpoint name (letters, digits, '_', '.', '-')")
    return workdir / CHECKPOINTS / name


def ram_vmas(pid: int, ram_file: Path) -> list[Vma]:
    """The mappings of ``ram_file`` in process ``pid``, found by device and inode.

    Raises:
        HypervisorError: the process does not map that file, or its maps cannot be read.
    """
    try:
        st = ram_file.stat()
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError as exc:
        raise HypervisorError(f"qemu: cannot find the guest RAM mapping of process {pid}: {exc}") from exc
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    vmas = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) >= 5 and fields[3] == dev and fields[4] == str(st.st_ino):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            vmas.append(Vma(start, end, int(fields[2], 16)))
    if not vmas:
        raise HypervisorError(f"qemu: process {pid} does not map {ram_file}")
    return vmas


def own_runs(pagemap: bytes) -> Iterator[tuple[int, int]]:
    """Runs ``(first, end)`` of the entries in ``pagemap`` (8 bytes per page, as the kernel
    writes ``/proc/PID/pagemap``) whose pages are the process's own: written or swapped."""
    flags = pagemap[7::8].translate(_OWN)
    for m in _OWN_RUN.finditer(flags):
        yield m.start(), m.end()


def _split_zero(data: bytes | memoryview, first: int) -> Iterator[tuple[int, int, bool]]:
    """Sub-runs ``(first, count, is_zero)`` of a run of pages read from the guest."""
    view = memoryview(data)
    n = len(view) // PAGE
    start, zero = 0, view[:PAGE] == _ZERO_PAGE
    for i in range(1, n):
        z = view[i * PAGE : (i + 1) * PAGE] == _ZERO_PAGE
        if z != zero:
            yield first + start, i - start, zero
            start, zero = i, z
    if n:
        yield first + start, n - start, zero


def _open_proc(pid: int, what: str, flags: int) -> int:
    try:
        return os.open(f"/proc/{pid}/{what}", flags | os.O_CLOEXEC)
    except OSError as exc:
        raise HypervisorError(f"qemu: cannot open /proc/{pid}/{what}: {exc.strerror}") from exc


def _pread(fd: int, size: int, at: int) -> bytes:
    try:
        data = os.pread(fd, size, at)
    except OSError as exc:
        raise HypervisorError(f"qemu: cannot read guest memory at {at:#x}: {exc.strerror}") from exc
    if len(data) != size:
        raise HypervisorError(f"qemu: short read of guest memory at {at:#x} ({len(data)} of {size} bytes)")
    return data


def _scan(pm: int, vma: Vma) -> list[tuple[int, int]] | None:
    """Runs ``(start, end)`` of addresses in ``vma`` the guest owns, filtered by the kernel
    (``PAGEMAP_SCAN``, Linux 6.7), or None where the kernel has no such call."""
    vec = (ctypes.c_uint64 * (3 * _SCAN_REGIONS))()
    runs: list[tuple[int, int]] = []
    start = vma.start
    while start < vma.end:
        arg = bytearray(
            _SCAN_ARG.pack(
                _SCAN_ARG.size, 0, start, vma.end, 0, ctypes.addressof(vec), _SCAN_REGIONS, 0,
                _IS_FILE, _IS_FILE, _IS_PRESENT | _IS_SWAPPED, _IS_PRESENT | _IS_SWAPPED,
            )
        )  # fmt: skip
        try:
            n = fcntl.ioctl(pm, _PAGEMAP_SCAN, arg)
        except OSError:
            return None
        runs += [(vec[3 * i], vec[3 * i + 1]) for i in range(n)]
        walked = _SCAN_ARG.unpack(arg)[4]
        if walked <= start:
            raise HypervisorError(f"qemu: the page map scan stopped at {walked:#x}")
        start = walked
    return runs


def _own_pages(pm: int, vma: Vma) -> Iterator[tuple[int, int]]:
    """Runs ``(first, end)`` of pages of ``vma`` the guest owns, as offsets in the RAM file."""
    base = vma.offset // PAGE
    scanned = _scan(pm, vma) if use_scan else None
    if scanned is not None:
        for start, end in scanned:
            yield base + (start - vma.start) // PAGE, base + (end - vma.start) // PAGE
        return
    n = (vma.end - vma.start) // PAGE
    table = _pread(pm, n * 8, vma.start // PAGE * 8)
    for first, end in own_runs(table):
        yield base + first, base + end


def save_ram(pid: int, ram_file: Path, out: Path) -> Saved:
    """Write the pages of ``ram_file``'s mapping in ``pid`` that the guest owns into ``out``.

    The guest must be stopped. Returns the counts; ``out`` is not fsynced (nor hashed: both
    can wait until the guest runs again).

    Raises:
        HypervisorError: the mapping, its page map or its memory cannot be read.
        OSError: ``out`` cannot be written.
    """
    vmas = ram_vmas(pid, ram_file)
    runs: list[tuple[int, int, int]] = []
    pages = zero = written = 0
    pm = _open_proc(pid, "pagemap", os.O_RDONLY)
    try:
        mem = _open_proc(pid, "mem", os.O_RDONLY)
        try:
            with out.open("wb") as f:
                for vma in vmas:
                    for first, end in _own_pages(pm, vma):
                        pages += end - first
                        # In pieces: a guest that wrote gigabytes costs no gigabytes here.
                        for at in range(first, end, _CHUNK // PAGE):
                            count = min(_CHUNK // PAGE, end - at)
                            data = _pread(mem, count * PAGE, vma.start + (at * PAGE - vma.offset))
                            for sub, n, is_zero in _split_zero(data, at):
                                runs.append((sub, n, _ZERO if is_zero else 0))
                                if is_zero:
                                    zero += n
                                else:
                                    piece = data[(sub - at) * PAGE : (sub - at + n) * PAGE]
                                    f.write(piece)
                                    written += len(piece)
                table = b"".join(_RUN.pack(*r) for r in runs)
                footer = _FOOTER.pack(_MAGIC, len(runs), written)
                f.write(table + footer)
        finally:
            os.close(mem)
    finally:
        os.close(pm)
    return Saved(pages, zero, written)


def _read_runs(path: Path) -> list[tuple[int, int, int]]:
    """The run table of ``ram.diff`` at ``path``, checked against the file's size.

    Raises:
        HypervisorError: the file is not a RAM diff or is cut short.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        if size < _FOOTER.size:
            raise HypervisorError(f"qemu: {path} is too short to be a checkpoint's RAM")
        f.seek(size - _FOOTER.size)
        magic, count, table_at = _FOOTER.unpack(f.read(_FOOTER.size))
        if magic != _MAGIC or table_at + count * _RUN.size + _FOOTER.size != size:
            raise HypervisorError(f"qemu: {path} is not a checkpoint's RAM, or it is damaged")
        f.seek(table_at)
        runs = list(_RUN.iter_unpack(f.read(count * _RUN.size)))
    data = sum(n for _, n, flags in runs if not flags & _ZERO) * PAGE
    if data != table_at:
        raise HypervisorError(f"qemu: {path} is not a checkpoint's RAM, or it is damaged")
    return runs


def load_ram(pid: int, ram_file: Path, diff: Path, ram_bytes: int) -> None:
    """Write the pages of ``diff`` into ``ram_file``'s mapping in ``pid`` (not yet running guest code).

    Raises:
        HypervisorError: the diff does not fit the mapping, or the memory cannot be written.
    """
    runs = _read_runs(diff)
    vmas = ram_vmas(pid, ram_file)

    def address(page: int, count: int) -> int:
        lo, hi = page * PAGE, (page + count) * PAGE
        for v in vmas:
            if v.offset <= lo and hi <= v.offset + (v.end - v.start):
                return v.start + (lo - v.offset)
        raise HypervisorError(f"qemu: {diff} names guest RAM at {lo:#x}, outside the {ram_bytes}-byte RAM")

    mem = _open_proc(pid, "mem", os.O_RDWR)
    try:
        with diff.open("rb") as f:
            for first, count, flags in runs:
                for at in range(first, first + count, _CHUNK // PAGE):
                    n = min(_CHUNK // PAGE, first + count - at)
                    data = bytes(n * PAGE) if flags & _ZERO else f.read(n * PAGE)
                    try:
                        done = os.pwrite(mem, data, address(at, n))
                    except OSError as exc:
                        raise HypervisorError(f"qemu: cannot write guest memory: {exc.strerror}") from exc
                    if done != len(data):
                        raise HypervisorError("qemu: short write of guest memory")
    finally:
        os.close(mem)


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint directory holds and what it applies to."""

    golden_ram: Path
    ram_bytes: int
    ram_sha256: str
    devices_sha256: str
    saved: Saved

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "golden_ram": str(self.golden_ram), "ram_bytes": self.ram_bytes,
            "ram_sha256": self.ram_sha256, "devices_sha256": self.devices_sha256,
            "pages": self.saved.pages, "zero_pages": self.saved.zero_pages,
            "data_bytes": self.saved.data_bytes,
        })  # fmt: skip


def write(target: Path, build: Callable[[Path], Manifest]) -> Manifest:
    """Build checkpoint directory ``target``: ``build(tmp)`` writes the RAM and device files
    into ``tmp`` and returns the manifest; the files are fsynced, the manifest written, and
    ``tmp`` renamed to ``target`` (the parent fsynced): whole or not at all.

    Raises:
        HypervisorError, OSError: from ``build``, or the files cannot be written.
    """
    target.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    try:
        manifest = build(tmp)
        for name in (RAM_FILE, DEVICES_FILE):
            fsync_path(tmp / name)
        (tmp / MANIFEST).write_text(manifest.to_json())
        fsync_path(tmp / MANIFEST)
        tmp.rename(target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def is_complete(d: Path) -> bool:
    return (d / MANIFEST).is_file()


def read_manifest(d: Path, *, verify: bool) -> Manifest:
    """The manifest of checkpoint directory ``d``; with ``verify``, its files' digests checked.

    Raises:
        HypervisorError: missing, malformed, or a file does not match its digest.
    """
    try:
        raw = json.loads((d / MANIFEST).read_text())
        if raw.get("format") != FORMAT:
            raise HypervisorError(f"qemu: checkpoint {d.name} has format {raw.get('format')!r}, not {FORMAT}")
        m = Manifest(
            Path(str(raw["golden_ram"])), int(raw["ram_bytes"]), str(raw["ram_sha256"]),
            str(raw["devices_sha256"]),
            Saved(int(raw["pages"]), int(raw["zero_pages"]), int(raw["data_bytes"])),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HypervisorError(f"qemu: checkpoint {d.name} has no readable manifest ({exc})") from exc
    if verify:
        for name, want in ((RAM_FILE, m.ram_sha256), (DEVICES_FILE, m.devices_sha256)):
            try:
                got = sha256_file(d / name)
            except OSError as exc:
                raise HypervisorError(f"qemu: checkpoint {d.name}: {name} is unreadable ({exc})") from exc
            if got != want:
                raise HypervisorError(f"qemu: checkpoint {d.name}: {name} does not match its digest")
    return m


def remove(d: Path) -> None:
    """Delete checkpoint directory ``d``: first out of sight (renamed), then its files."""
    if not d.exists():
        return
    gone = d.with_name(f".{d.name}.gone")
    shutil.rmtree(gone, ignore_errors=True)
    d.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def names(workdir: Path) -> list[str]:
    """The complete checkpoint directories of ``workdir``, oldest first."""
    root = workdir / CHECKPOINTS
    try:
        found = [d for d in root.iterdir() if not d.name.startswith(".") and is_complete(d)]
    except OSError:
        return []
    return [d.name for d in sorted(found, key=lambda d: d.stat().st_mtime_ns)]


def size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())
