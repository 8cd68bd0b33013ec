"""App-level checkpoints (:attr:`CheckpointMode.APP`): the program's own checkpoint files.

Beside the VM snapshots of :mod:`.checkpoint`: when the job says the program checkpoints
itself, a checkpoint is a copy of the files the job lists, taken at the program's
``checkpoint_ready``, kept in a slot directory under each file's index in the job's list.
A restart boots afresh, installs the package, puts the files back and starts the program.
The crash invariant is the same: the directory is complete and durable before the
checkpoint record naming it is committed.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from boincvm.atomicdir import fsync_path
from boincvm.errors import GuestError
from boincvm.wrapper.guest_contract import GuestFileKind, kind_problem
from boincvm.wrapper.guest_files import GuestFiles

#: At most this much of each app-level checkpoint file is copied out.
APP_CHECKPOINT_MAX_BYTES = 1 << 30


def directory_name(sequence: int) -> str:
    """The slot directory of the app-level checkpoint ``sequence``."""
    return f"boincvm_appck{sequence}"


def save(files: GuestFiles, target: Path) -> None:
    """Copy the program's checkpoint files out to ``target`` durably (each file written
    and fsynced under a temporary name, the directory renamed into place and fsynced);
    the record naming it is committed only after this returns.

    Raises:
        GuestError: a checkpoint file is not a regular file, or the guest could not say.
    """
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.mkdir()
    names = files.job.checkpoint_files
    kinds = files.kinds(sorted({files.path(n) for n in names}))
    for i, name in enumerate(names):
        guest = files.path(name)
        kind = kinds.get(guest, GuestFileKind.MISSING)
        if kind is GuestFileKind.MISSING:
            continue  # not written yet: the restart goes without it, as the program would
        if problem := kind_problem(kind):
            raise GuestError(f"checkpoint file {name}: guest file {guest} {problem}")
        files.vm.copy_from_guest(guest, tmp / str(i), max_bytes=APP_CHECKPOINT_MAX_BYTES)
        fsync_path(tmp / str(i))
    tmp.replace(target)
    fsync_path(target.parent)


def put_back(files: GuestFiles, saved: Path) -> None:
    """Copy the files of the checkpoint ``saved`` into the guest (the package is installed).

    Raises:
        GuestProgramFailed: the guest could not make the files' directories.
    """
    names = files.job.checkpoint_files
    dirs = {os.path.dirname(files.path(n)) for n in names}  # noqa: PTH120
    files.sh("mkdir -p " + " ".join(shlex.quote(d) for d in sorted(dirs) if d), what="making directories")
    for i, name in enumerate(names):
        if (saved / str(i)).is_file():
            files.vm.copy_to_guest(saved / str(i), files.path(name))


def drop(saved: Path) -> None:
    """Delete the checkpoint ``saved`` (a later one is committed, or the job is over)."""
    shutil.rmtree(saved, ignore_errors=True)


__all__ = ["APP_CHECKPOINT_MAX_BYTES", "directory_name", "drop", "put_back", "save"]
