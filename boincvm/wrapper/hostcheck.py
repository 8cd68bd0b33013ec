"""Before the VM starts: can this host run the job, and how?

Three questions, asked in this order so that a refusal costs nothing (no QEMU process, no
overlay, no trial boot): enough memory, enough disk, and hardware acceleration.

Memory and disk distinguish *never* from *not now*, as BOINC's own apps do for transient
shortages: a job that needs more memory than the host has at all (``MemTotal``), or more
disk than the slot's file system holds, can never run here and ends the task at once (the
project should not have sent it: its plan class or ``rsc_memory_bound`` is wrong); a job
that needs more than is free *now* (``MemAvailable``, free blocks) makes a temporary exit
and the client retries later, when other programs may have let go. The client gives up
after 100 exits without a checkpoint, so a host that never frees memory still ends the task.

KVM that cannot be used (missing, permission, nested KVM that hangs) means TCG, with one
line in stderr.txt that says why and how to fix it; where the job says
``<vm_accel_required/>``, a temporary exit with a notice the volunteer sees instead.

The decisions are pure functions of :class:`HostFacts`, so every reason -> line -> outcome
is unit-tested; :func:`gather` reads the facts of this host.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from boincvm.boinc.files import ExitCode
from boincvm.hypervisor.base import Availability
from boincvm.job import CHECKPOINT_DISK_MARGIN_MB, checkpoint_disk_mb

MIB = 1024 * 1024
DISK_MARGIN_MB = CHECKPOINT_DISK_MARGIN_MB
#: Delays of the temporary exits (seconds): a shortage may pass; a missing KVM needs the owner.
SHORTAGE_DELAY = 600.0
NO_KVM_DELAY = 3600.0


class Verdict(enum.StrEnum):
    """What the wrapper does after a check."""

    RUN = "run"  # go on (possibly with a note logged)
    POSTPONE = "postpone"  # temporary exit: the client restarts the task after ``delay``
    REFUSE = "refuse"  # end the task now with ``exit_code``


@dataclass(frozen=True)
class Decision:
    """One check's outcome and the one line the wrapper writes to stderr.txt (empty: nothing to say)."""

    verdict: Verdict
    line: str = ""
    exit_code: ExitCode | None = None
    delay: float = 0.0
    notice: bool = False


GO = Decision(Verdict.RUN)


@dataclass(frozen=True)
class HostFacts:
    """What the checks need to know about this host (MiB; None: could not be read)."""

    mem_total_mb: int | None
    mem_available_mb: int | None
    disk_total_mb: int | None
    disk_free_mb: int | None


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """``MemTotal`` and ``MemAvailable`` of ``/proc/meminfo`` text, in MiB (None when absent)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[name.strip()] = int(fields[0]) // 1024  # the kernel writes kB (KiB)
    return values.get("MemTotal"), values.get("MemAvailable")


def gather(slot: Path) -> HostFacts:
    """Read this host's memory (``/proc/meminfo``) and the slot's file system (``statvfs``)."""
    total: int | None
    available: int | None
    disk_total: int | None
    disk_free: int | None
    try:
        total, available = parse_meminfo(Path("/proc/meminfo").read_text(encoding="ascii", errors="replace"))
    except OSError:
        total = available = None
    try:
        st = os.statvfs(slot)
        disk_total, disk_free = st.f_blocks * st.f_frsize // MIB, st.f_bavail * st.f_frsize // MIB
    except OSError:
        disk_total = disk_free = None
    return HostFacts(total, available, disk_total, disk_free)


def memory_need_mb(memory_mb: int, overhead_mb: int) -> int:
    """The host memory a VM of ``memory_mb`` needs: the guest's, plus the hypervisor's own."""
    return memory_mb + overhead_mb


def disk_need_mb(memory_mb: int, rsc_disk_bound: float, used_mb: int = 0) -> int:
    """Free disk the slot needs: two checkpoints' memory images (the new one is taken before the
    old one is dropped) plus room for the guest's writes, at most the workunit's ``rsc_disk_bound``
    (the client stops a task that uses more), less what the VM's files already use."""
    need = checkpoint_disk_mb(memory_mb)
    if rsc_disk_bound > 0:
        need = min(need, int(rsc_disk_bound // MIB))
    return max(0, need - used_mb)


@dataclass(frozen=True)
class _Room:
    """How the host checks speak of one resource (memory or disk) in their lines."""

    what: str
    #: What the need covers, and what has the total, in the refusal.
    need_covers: str
    holder: str
    #: Said after a refusal: who should have kept the job away.
    refuse_note: str
    #: Said after a postponement: how the volunteer frees some.
    to_free: str
    exit_code: ExitCode


_MEMORY = _Room(
    "memory",
    " (VM and QEMU)",
    "this host has",
    " (the project's plan class or rsc_memory_bound should keep this job from such hosts)",
    "close other programs to free memory",
    ExitCode.MEM_LIMIT_EXCEEDED,
)
_DISK = _Room(
    "disk",
    " for its overlay and checkpoints",
    "the slot's file system holds",
    "",
    "free disk space or raise BOINC's disk limit",
    ExitCode.DISK_LIMIT_EXCEEDED,
)


def _check_room(need_mb: int, total: int | None, free: int | None, room: _Room) -> Decision:
    """Refuse a job larger than all of ``room``; postpone one larger than what is free now
    (an unknown total or free amount lets the job go)."""
    if total is not None and need_mb > total:
        return Decision(
            Verdict.REFUSE,
            f"host check: the job needs {need_mb} MiB of {room.what}{room.need_covers} but "
            f"{room.holder} {total} MiB in all; refusing before the VM starts{room.refuse_note}",
            room.exit_code,
        )
    if free is not None and need_mb > free:
        return Decision(
            Verdict.POSTPONE,
            f"host check: the job needs {need_mb} MiB of {room.what} but only {free} MiB are free "
            f"now; trying again in {SHORTAGE_DELAY:g} s ({room.to_free})",
            delay=SHORTAGE_DELAY,
        )
    return GO


def check_memory(need_mb: int, facts: HostFacts) -> Decision:
    """Refuse a job larger than the host's memory; postpone one larger than what is free now."""
    return _check_room(need_mb, facts.mem_total_mb, facts.mem_available_mb, _MEMORY)


def check_disk(need_mb: int, facts: HostFacts) -> Decision:
    """Refuse a job larger than the slot's file system; postpone one larger than its free space."""
    return _check_room(need_mb, facts.disk_total_mb, facts.disk_free_mb, _DISK)


#: The errors of a write that a full disk (or a full quota) refused.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def check_disk_after_failure(slot: Path, memory_mb: int, cause: str, *, full: bool = False) -> Decision:
    """After a step failed (``cause``): postpone when the slot's disk is too full for a
    checkpoint of all of the VM's ``memory_mb`` (or ``full``: the error said so), else GO.

    QEMU says only "Input/output error" when a snapshot meets a full disk; the volunteer
    should read that the disk is full, and the task waits as long as for any shortage.
    """
    free = gather(slot).disk_free_mb
    if not full and (free is None or free >= memory_mb):
        return GO
    left = "" if free is None else f" ({free} MiB free)"
    return Decision(
        Verdict.POSTPONE,
        f"the slot's disk is full{left}: {cause}; going on from the last checkpoint in "
        f"{SHORTAGE_DELAY:g} s ({_DISK.to_free})",
        delay=SHORTAGE_DELAY,
    )


def check_accel(accel: Availability, *, required: bool) -> Decision:
    """TCG with a note when KVM is unusable; a temporary exit with a notice when the job requires it."""
    if accel.ok:
        return GO
    fix = f"; fix: {accel.detail}" if accel.detail else ""
    if required:
        return Decision(
            Verdict.POSTPONE,
            f"KVM is required by this job but unusable: {accel.reason}{fix}",
            delay=NO_KVM_DELAY,
            notice=True,
        )
    return Decision(Verdict.RUN, f"KVM unusable, running on TCG (much slower): {accel.reason}{fix}")


def dir_size_mb(path: Path) -> int:
    """MiB the files below ``path`` occupy on disk (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_blocks * 512
            except OSError:
                continue
    return total // MIB
