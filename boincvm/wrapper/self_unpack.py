"""The static wrapper's part in the wrapper's runtime: unpack it for the tasks that come next.

The Linux app version's launcher (:mod:`boincvm.appversion.wrapper_runtime`) starts the
wrapper's runtime once it is unpacked beside the launcher, and the static wrapper until
then, naming the runtime's archive in ``BOINCVM_WRAPPER_RUNTIME``. The static wrapper then
unpacks it in a thread of its own while its task runs, so this task loses nothing and the
next one starts without any unpack. A failure costs only speed: it is logged, and the next
task starts the static wrapper again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from boincvm.errors import BoincvmError
from boincvm.proc import WRAPPER_RUNTIME_ENV

#: At its end, the task waits this long at most for an unpack still running.
FINISH_WAIT = 120.0

log = logging.getLogger(__name__)


def _unpack(archive: Path) -> None:
    from boincvm import unpacked  # tarfile and lzma: only when there is something to unpack

    started = time.monotonic()
    try:
        root, _ = unpacked.unpack_once(archive, unpacked.WRAPPER)
    except (BoincvmError, OSError) as exc:
        log.warning("the wrapper's runtime stays packed, so the next task starts slower: %s", exc)
        return
    took = time.monotonic() - started
    log.info("unpacked the wrapper's runtime for later tasks in %.2f s: %s", took, root.name)


def start_unpacking() -> threading.Thread | None:
    """Unpack the archive the launcher named (if it named one) in a daemon thread; the
    variable is removed, so no child process sees it.

    A task that ends first leaves a ``.tmp-*`` directory behind, which the next unpack removes.
    """
    named = os.environ.pop(WRAPPER_RUNTIME_ENV, None)
    if not named:
        return None
    thread = threading.Thread(target=_unpack, args=(Path(named),), name="unpack-wrapper-runtime", daemon=True)
    thread.start()
    return thread


def finish(thread: threading.Thread, timeout: float = FINISH_WAIT) -> None:
    """Let an unpack still running end before the wrapper does (at most ``timeout`` seconds):
    the first task of an app version on a host leaves the runtime unpacked, unless it was killed."""
    if thread.is_alive():
        log.info("waiting for the wrapper's runtime to be unpacked")
    thread.join(timeout)
