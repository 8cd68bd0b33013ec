"""Directories that appear whole or not at all.

Generated directories (workunits, app versions) are built in a temporary sibling and
renamed into place at the end, so a failure, an interrupt or a full disk never leaves
half an artefact where a user (or a BOINC project) would pick it up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from boincvm.errors import InputError
from boincvm.paths import check_output_dir


@contextmanager
def building(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; move it to ``out`` when the block succeeds.

    Raises:
        InputError: ``out`` exists and ``force`` is false, or cannot be made (see
            :func:`boincvm.paths.check_output_dir`).
    """
    check_output_dir(out)
    if out.exists() and not force:
        raise InputError(
            f"{out} already exists", hint="choose another --output-dir or add --force to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a project's web server serves these files
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def file_in_place(target: Path, *, mode: int) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write; when the block succeeds it gets
    ``mode`` and is renamed to ``target``, so no reader ever meets half a file there.

    A failure (an interrupt too) removes the temporary file and leaves ``target`` as it was.
    Unlike :func:`write_file_atomically` nothing is synced: for files that can be made again.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(mode)
        tmp.rename(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole or not at all, durably: a temporary sibling,
    fsync, rename, fsync of the directory (so the new file survives a power cut too).

    The file keeps the mode of the one it replaces (0644 for a new one), so a project's web
    server and daemons read it as before.
    """
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(mode)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
