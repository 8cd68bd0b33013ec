"""Golden checkpoints: boot an image once, keep the running guest, start every job from it.

A cold boot under TCG costs about 2-5 s; restoring a saved guest costs about 0.2-0.4 s.
So the first fresh start of an image (per accelerator, machine, memory, CPUs and
network setting) boots it, waits for the agent, stops the VM and migrates its state to
``golden.mig``; the disk it had at that instant is kept as ``golden.qcow2``. Later jobs
get an overlay on ``golden.qcow2`` and ``-incoming fd:N``, N an inherited descriptor of
``golden.mig``; it was written the same way, through a descriptor handed to QEMU (``getfd``).

The guest's RAM is not in ``golden.mig``: the VM that saves it runs with its RAM in a
file mapped shared (QEMU's ``memory-backend-file,share=on``) and migrates with
``x-ignore-shared``, so the stream holds only the devices; that file becomes
``golden.ram``. While the VM boots it is a tmpfs file when ``/dev/shm`` has room (under
TCG, first touches of a disk file's pages made the boot 0.5-1 s slower), copied into the
cache once saved, its zero blocks left as holes. Every job maps
``golden.ram`` privately (``share=off``): pages the guest only reads stay in the host's
page cache, one copy for all the tasks on the host, and a page it writes becomes that
task's own (copy-on-write), as Firecracker restores snapshots. A task thus costs the host
the memory its guest dirtied, not its whole RAM; and a restore reads nothing it does not
touch.

Golden checkpoints live in ``<cache>/golden/<key>/``, built in a temporary directory and
renamed into place; the key covers every input that the saved state depends on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from boincvm import proc
from boincvm.cache import cache_root, content_digest
from boincvm.errors import HypervisorError

if TYPE_CHECKING:
    from boincvm.hypervisor.base import VmSpec

log = logging.getLogger(__name__)

GOLDEN_DISK = "golden.qcow2"
GOLDEN_STATE = "golden.mig"
GOLDEN_RAM = "golden.ram"
#: The base image the golden disk is an overlay on (a hard link or a copy of the job's image).
GOLDEN_BASE = "base.img"
#: Written next to a golden checkpoint whose state failed to load: no job uses it again.
BROKEN = "broken"
#: Bumped when the saved state's shape changes (devices, command line).
GOLDEN_VERSION = 3
#: Touched whenever a VM starts from, resumes on or checkpoints over a golden checkpoint.
USED = "used"
#: A golden checkpoint no VM has used for this long is removed (:func:`prune`). Every task
#: that depends on one touches it at each start, resume and checkpoint, so only a task
#: suspended for a month loses it (its checkpoint is refused and it starts again); an app
#: version replaced by a newer one otherwise keeps its image's blocks forever (the golden
#: disk's base is a hard link of it).
MAX_IDLE_S = 30 * 24 * 3600
#: A build directory older than this was left by a build that was killed.
STALE_BUILD_S = 24 * 3600
#: In the names of the build's and :func:`prune`'s temporary directories (``.<key><tag>...``).
_BUILD_TAG, _PRUNED_TAG = ".build-", ".pruned-"


@dataclass(frozen=True)
class Golden:
    """A prepared checkpoint: the disk to put the job overlay on, the device state to load
    and the guest RAM to map privately."""

    disk: Path
    state: Path
    ram: Path


def _content(path: Path | None) -> list[object]:
    """A kernel, initramfs or disk image by content: every data directory's copy of an app
    version's files shares one golden checkpoint (the golden disk has its own base)."""
    return [None] if path is None else [path.stat().st_size, content_digest(path)]


def golden_key(spec: VmSpec, accel: str, machine: str, qemu: str) -> str:
    """The cache key: images, command line, machine shape and the QEMU binary (``qemu_identity``)."""
    facts = [GOLDEN_VERSION, qemu, accel, machine, spec.memory_mb, spec.ncpus, spec.enable_network]
    facts += [spec.kernel_cmdline, *_content(spec.kernel), *_content(spec.initrd), *_content(spec.image)]
    if machine == "q35":  # q35 guests carry the root port transfer disks are plugged into
        facts.append("hotplug-port")
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:24]


def _root() -> Path:
    return cache_root() / "golden"


def find(key: str) -> Golden | None:
    """The golden checkpoint for ``key`` if it is built and has not failed to load."""
    d = _root() / key
    g = Golden(d / GOLDEN_DISK, d / GOLDEN_STATE, d / GOLDEN_RAM)
    complete = g.disk.is_file() and g.state.is_file() and g.ram.is_file()
    return g if complete and not (d / BROKEN).exists() else None


def mark_used(ram: Path) -> None:
    """Record that a VM uses the golden checkpoint whose RAM is ``ram`` (anything else: no-op)."""
    d = ram.parent
    if d.parent != _root() or d.name.startswith("."):
        return
    try:
        (d / USED).touch()
    except OSError as exc:  # a read-only cache: pruning then goes by the build's age
        log.debug("cannot mark %s used: %s", d, exc)


def prune(now: float | None = None, max_idle: float = MAX_IDLE_S, keep_bytes: int | None = None) -> list[str]:
    """Remove the golden checkpoints no VM has used for ``max_idle`` seconds, and build
    directories of killed builds; the names removed.

    With ``keep_bytes``, the least recently used of the rest go too, until the cache holds
    at most that many bytes; one used within the last :data:`RECENT_S` is always kept (a
    VM may be starting from it). An entry is renamed aside first (one atomic step that a
    VM starting from it would see as "not built"), then deleted; a failure leaves it for
    the next prune.
    """
    root = _root()
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    kept: list[tuple[float, int, Path]] = []  # last use, bytes, entry
    for d in entries:
        if not d.is_dir() or d.is_symlink():
            continue
        try:
            if d.name.startswith("."):
                leftover = _BUILD_TAG in d.name or _PRUNED_TAG in d.name
                if leftover and now - d.stat().st_mtime > STALE_BUILD_S:
                    shutil.rmtree(d)
                    removed.append(d.name)
                    log.info("removed %s, left in the golden cache by a killed build or prune", d.name)
                continue
            used = d / USED
            last = (used if used.exists() else d).stat().st_mtime
            if now - last <= max_idle:
                kept.append((last, _allocated(d), d))
                continue
            _remove(d)
            removed.append(d.name)
            log.info(
                "removed the golden checkpoint %s: no VM used it for %.0f days", d.name, max_idle / 86400
            )
        except OSError as exc:
            log.info("cannot prune the golden checkpoint %s: %s", d.name, exc)
    if keep_bytes is not None:
        removed += _evict(kept, now, keep_bytes)
    return removed


#: :func:`prune` never evicts by size a golden checkpoint used this recently.
RECENT_S = 3600.0


def _allocated(d: Path) -> int:
    """The bytes a golden checkpoint's files take on disk (its RAM file is sparse)."""
    return sum(f.stat().st_blocks * 512 for f in d.iterdir() if f.is_file() and not f.is_symlink())


def _remove(d: Path) -> None:
    aside = d.parent / f".{d.name}{_PRUNED_TAG}{os.getpid()}"
    d.rename(aside)
    shutil.rmtree(aside)


def _evict(kept: list[tuple[float, int, Path]], now: float, keep_bytes: int) -> list[str]:
    """Remove the least recently used of ``kept`` until the rest fit in ``keep_bytes``."""
    removed: list[str] = []
    total = sum(size for _, size, _ in kept)
    for last, size, d in sorted(kept, key=lambda e: e[0]):
        if total <= keep_bytes or now - last <= RECENT_S:
            break
        try:
            _remove(d)
        except OSError as exc:
            log.info("cannot prune the golden checkpoint %s: %s", d.name, exc)
            continue
        total -= size
        removed.append(d.name)
        log.info(
            "removed the golden checkpoint %s: the least recently used beyond %d MiB",
            d.name,
            keep_bytes >> 20,
        )
    return removed


def is_broken(key: str) -> bool:
    """True when the golden checkpoint for ``key`` failed to load (see :func:`mark_broken`)."""
    return (_root() / key / BROKEN).exists()


def mark_broken(golden: Golden, reason: str) -> None:
    """Stop using ``golden`` after its state failed to load; jobs then boot cold.

    Nothing is deleted: overlays of running jobs, and their checkpoints, still have
    ``golden.qcow2`` as their backing file. Deleting the cache directory by hand
    (``~/.cache/boincvm/golden``) once no job runs lets the next job build a new one.
    """
    marker = golden.state.parent / BROKEN
    try:
        marker.write_text(reason + "\n")
    except OSError as exc:
        log.warning("cannot mark the golden checkpoint %s broken: %s", golden.state.parent, exc)


#: Where the building VM's RAM lives while it boots, when one has room: a tmpfs file,
#: copied into the cache once saved. Under TCG first touches of a shared mapping of a disk
#: file made the boot to the agent 0.5-1 s slower than with RAM-backed pages.
SCRATCH_DIRS = (Path("/dev/shm"),)
#: Room left in the tmpfs beyond the guest's RAM.
_SCRATCH_MARGIN = 64 << 20

#: Blocks read at a time when copying sparsely or digging holes.
_BLOCK = 1 << 20
_FS_BLOCK = 4096
#: fallocate(2)'s FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE.
_PUNCH_HOLE = 0x01 | 0x02


def _zero_runs(data: bytes, at: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of the runs of all-zero 4 KiB blocks in ``data`` read at ``at``."""
    zero = bytes(_FS_BLOCK)
    start = None
    for i in range(0, len(data), _FS_BLOCK):
        block = data[i : i + _FS_BLOCK]
        if block == zero[: len(block)]:
            start = i if start is None else start
        elif start is not None:
            yield at + start, i - start
            start = None
    if start is not None:
        yield at + start, len(data) - start


def dig_holes(path: Path) -> None:
    """Turn the all-zero blocks of ``path`` into holes (``fallocate --dig-holes``, in
    Python: busybox's fallocate, the one Alpine has, cannot).

    Raises:
        OSError: the file cannot be read, or the file system cannot punch holes.
    """
    import ctypes

    fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for at, data in _data_blocks(fd):
            for offset, length in _zero_runs(data, at):
                if fallocate(fd, _PUNCH_HOLE, offset, length) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _data_blocks(fd: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of the file open at ``fd``, :data:`_BLOCK` at a time, its holes skipped."""
    size, at = os.fstat(fd).st_size, 0
    while at < size:
        try:
            at = os.lseek(fd, at, os.SEEK_DATA)  # skip what is a hole already
        except OSError:
            return  # ENXIO: only holes after ``at``
        data = os.pread(fd, _BLOCK, at)
        if not data:
            return
        yield at, data
        at += len(data)


def _copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` leaving its all-zero blocks as holes (``cp --sparse=always``,
    in Python: busybox's cp has no such option)."""
    zero = bytes(_BLOCK)
    with src.open("rb") as r, dst.open("wb") as w:
        while data := r.read(_BLOCK):
            if data == zero[: len(data)]:
                w.seek(len(data), os.SEEK_CUR)
            else:
                w.write(data)
        w.truncate()


def copy_nonzero(src_fd: int, dst: Path) -> None:
    """Write the file open at ``src_fd`` to a new ``dst``, synced, its holes and all-zero
    4 KiB blocks left as holes (what :func:`dig_holes` makes of a copy, without writing them).

    Raises:
        OSError: reading or writing failed (the disk is full).
    """
    zero = bytes(_BLOCK)
    size = os.fstat(src_fd).st_size
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for at, data in _data_blocks(src_fd):
            if data != zero[: len(data)]:
                view, done = memoryview(data), 0
                for offset, length in [*_zero_runs(data, 0), (len(data), 0)]:
                    if offset > done:
                        os.pwrite(fd, view[done:offset], at + done)
                    done = offset + length
        os.fsync(fd)
    finally:
        os.close(fd)


def _scratch_ram(memory_mb: int) -> tuple[Path, int] | None:
    """A new file, and a descriptor of it, in a tmpfs of :data:`SCRATCH_DIRS` with room for
    ``memory_mb`` of guest RAM; None when none has."""
    for d in SCRATCH_DIRS:
        try:
            st = os.statvfs(d)
            if st.f_bavail * st.f_frsize < (memory_mb << 20) + _SCRATCH_MARGIN:
                continue
            fd, name = tempfile.mkstemp(dir=d, prefix="boincvm-golden-", suffix=".ram")
        except OSError:
            continue
        return Path(name), fd
    return None


def _settle_ram(scratch: tuple[Path, int] | None, ram: Path) -> None:
    """Put the saved guest RAM at ``ram``, sparse and synced: copied from the tmpfs file of
    ``scratch``, or, when the VM wrote ``ram`` itself, its zero blocks made holes.

    Raises:
        HypervisorError: the copy failed (the disk is full): the job boots cold.
    """
    if scratch is not None:
        try:
            copy_nonzero(scratch[1], ram)
        except OSError as exc:
            raise HypervisorError(f"qemu: the golden checkpoint's RAM cannot be written: {exc}") from exc
        return
    # A guest booted with init_on_free=1 zeroes every page it frees, so the file is
    # fully written; its zero blocks become holes again (disk use = what the guest holds).
    try:
        dig_holes(ram)
    except OSError as exc:  # only disk space: the checkpoint works as it is
        log.info("could not make %s sparse: %s", ram, exc)
    with ram.open("rb") as r:  # what the saving QEMU wrote through its shared mapping
        os.fsync(r.fileno())


def _own_base(image: Path, out: Path, img: Sequence[str]) -> None:
    """Give the golden disk its own base: ``image`` linked (or copied) next to it and named
    as its backing file by a relative name, so the golden checkpoint, keyed by content and
    shared by every data directory, outlives the project directory whose copy built it.
    ``img`` is the argv prefix of the qemu-img to use.

    Raises:
        ToolError: qemu-img failed, or the copy did.
    """
    base = out / GOLDEN_BASE
    try:
        os.link(image, base)  # app version files never change: one inode serves both
    except OSError:
        _copy_sparse(image, base)
    info = json.loads(proc.run([*img, "info", "-U", "--output=json", base], timeout=60).text)
    fmt = str(info["format"])
    proc.run([*img, "rebase", "-u", "-b", GOLDEN_BASE, "-F", fmt, out / GOLDEN_DISK], timeout=60)


def build(
    spec: VmSpec, key: str, accel: str, save: Callable[[VmSpec, Path, Path, bool], None], img: Sequence[str]
) -> Golden:
    """Boot ``spec`` once, save the running guest and freeze its disk; return the result.

    ``save(boot, state, ram, scratch)`` boots ``boot`` (its work directory under the build
    directory) with its RAM mapped shared from the file ``ram``, waits for the agent and
    writes the stopped guest's device state to ``state``; with ``scratch`` the file is a
    tmpfs one this function reads through its own descriptor, which ``save`` unlinks once
    QEMU has it open (a killed build then leaves nothing in the tmpfs). The QEMU backend
    passes its own (this module knows the cache, the backend knows QEMU), and ``img`` the
    argv prefix of its qemu-img.

    Raises:
        HypervisorError: the boot or the migration failed.
        GuestToolsMissing: the guest agent never answered.
    """
    root = _root()
    root.mkdir(parents=True, exist_ok=True)
    # A new golden checkpoint is the moment an old one may have been superseded.
    prune()
    work = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}{_BUILD_TAG}"))
    scratch = _scratch_ram(spec.memory_mb)
    try:
        options = {**spec.options, "golden": "no", "accel": accel}
        boot = dataclasses.replace(spec, name=f"golden-{key[:8]}", workdir=work / "vm", options=options)
        ram = work / "vm" / GOLDEN_RAM
        save(boot, work / "vm" / GOLDEN_STATE, scratch[0] if scratch else ram, scratch is not None)
        out = work / "golden"
        out.mkdir()
        (work / "vm" / "disk.qcow2").rename(out / GOLDEN_DISK)
        if spec.image is not None:
            _own_base(spec.image.resolve(), out, img)
        (work / "vm" / GOLDEN_STATE).rename(out / GOLDEN_STATE)
        _settle_ram(scratch, ram)
        ram.rename(out / GOLDEN_RAM)
        for f in (out / GOLDEN_DISK, out / GOLDEN_STATE):
            f.chmod(0o444)
        # QEMU 7.2 opens a memory-backend-file read-write even to map it privately (it never
        # writes it then): the owner keeps write permission.
        (out / GOLDEN_RAM).chmod(0o644)
        try:
            out.rename(root / key)
        except OSError:
            if find(key) is None:  # not a concurrent build that won the race
                raise
        found = find(key)
        if found is None:
            raise HypervisorError(f"qemu: the golden checkpoint {key} vanished after it was built")
        return found
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if scratch is not None:
            os.close(scratch[1])
            scratch[0].unlink(missing_ok=True)
