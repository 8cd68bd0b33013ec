"""staticx's unpacked directories: the live one marked, those a SIGKILL left behind removed.

The frozen wrapper's outer layer (staticx) unpacks its libraries into ``$TMPDIR/staticx-XXXXXX``
at every start and removes the directory when the wrapper exits, but a SIGKILL (the client
killing a task, a whole process group killed by BOINC's wsl_wrapper) leaves it behind, a few
MB each time. The wrapper cannot clean up after its own SIGKILL, so each start cleans up
after the earlier ones:

* it marks its own directory as in use: a lock file, created under a temporary name, locked
  (``flock``), then renamed to :data:`MARKER`, held until the process ends (the kernel
  releases it however the process dies);
* it removes every sibling ``staticx-*`` directory that carries the marker and whose lock
  it can take: no live wrapper holds it. Directories without the marker (another program's
  staticx, a wrapper still starting) are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

#: The lock file a live frozen wrapper holds in its unpacked directory.
MARKER = ".boincvm-wrapper.lock"
#: The prefix staticx gives its directories.
PREFIX = "staticx-"

#: The held lock of this process's own directory (kept open for the life of the process).
_held: list[int] = []


def mark_in_use(bundle: Path) -> None:
    """Lock ``bundle`` (this process's unpacked directory) as in use until the process ends.

    Raises:
        OSError: the marker could not be created or locked.
    """
    tmp = bundle / f"{MARKER}.{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        tmp.replace(bundle / MARKER)  # only ever seen under its name once locked
    except OSError:
        os.close(fd)
        raise
    _held.append(fd)


def remove_abandoned(bundle: Path) -> list[Path]:
    """Remove the marked ``staticx-*`` siblings of ``bundle`` no live wrapper holds; return them.

    Errors are logged, never raised: a directory left behind costs disk space, not the task.
    """
    return remove_abandoned_in(bundle.parent, keep=bundle)


def remove_abandoned_in(parent: Path, keep: Path | None = None) -> list[Path]:
    """Remove the marked ``staticx-*`` directories in ``parent`` (but ``keep``) no live wrapper
    holds; return them. The wrapper's runtime, which staticx does not start, calls this on
    staticx's directory (``$TMPDIR``, else ``/tmp``): the static wrapper killed before it left them.
    """
    removed: list[Path] = []
    try:
        siblings = [p for p in parent.iterdir() if p.name.startswith(PREFIX) and p != keep]
    except OSError as exc:
        log.debug("cannot list %s: %s", parent, exc)
        return removed
    for other in siblings:
        if _remove_if_abandoned(other):
            removed.append(other)
    return removed


def _remove_if_abandoned(directory: Path) -> bool:
    try:
        if directory.is_symlink() or not directory.is_dir() or directory.stat().st_uid != os.getuid():
            return False
        fd = os.open(directory / MARKER, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False  # no marker: not ours, or a wrapper still starting
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live wrapper holds it
        shutil.rmtree(directory)
        log.info("removed %s, left behind by a killed wrapper", directory)
        return True
    except OSError as exc:
        log.debug("could not remove %s: %s", directory, exc)
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def tidy(bundle: Path) -> None:
    """Mark ``bundle`` as in use, then remove what killed wrappers left beside it."""
    try:
        mark_in_use(bundle)
    except OSError as exc:
        log.debug("cannot mark %s: %s", bundle, exc)
        return  # unmarked, it is safe from other wrappers' sweeps; sweeping is not urgent
    remove_abandoned(bundle)
