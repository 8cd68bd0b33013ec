"""The end of a run under BOINC's ``wsl_wrapper`` (Windows hosts, inside WSL).

``wsl_wrapper`` starts the main program as ``echo $$; ./main ARGS; touch boinc_job_done``
in a shell of the distro, in the slot directory, and judges the job by two things only:
no process of that shell's group is left, and ``boinc_job_done`` exists. The shell touches
the file whatever ``main`` exits with, so an exit code cannot carry a failure. A failed
task therefore ends by killing its own process group: the shell dies before it touches
``boinc_job_done``, and wsl_wrapper reports the failure to the client (``boinc_finish(1)``),
as the server must see it. The reason is already in the log, which wsl_wrapper passes to
the client's ``stderr.txt``.

wsl_wrapper reads the program's output only once the job is over, through a pipe: a
wrapper that logged there as it does under a Linux client would fill the pipe and block.
Behind wsl_wrapper the log goes to :data:`LOG_FILE` in the slot, and only the reason of
a failure, one line (the finish file's message), to stderr (which wsl_wrapper passes on
to the client's ``stderr.txt``).

Nobody restarts the program after a temporary exit either (the Windows client restarts
``wsl_wrapper``, not us, and only when it exits), so the wrapper waits the delay out
itself and runs the task again from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from boincvm.boinc.files import TEMPORARY_EXIT_FILE, TemporaryExit, read_finish_file

log = logging.getLogger(__name__)

#: The wrapper's log behind wsl_wrapper, in the slot.
LOG_FILE = "boincvm_wrapper.log"
#: The format of every log line (the same as under a Linux client).
LOG_FORMAT = "%(asctime)s.%(msecs)03d boincvm: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

#: At most this long between two runs after a temporary exit (the delay the program or
#: the wrapper asked for, cut so a volunteer's task does not sleep for a day in WSL).
MAX_WAIT = 3600.0


def log_to_slot(slot: Path) -> None:
    """Send the log to :data:`LOG_FILE` in ``slot`` instead of stderr (idempotent)."""
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) for h in root.handlers):
        return
    for handler in list(root.handlers):
        root.removeHandler(handler)
    to_file = logging.FileHandler(slot / LOG_FILE, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    root.addHandler(to_file)
    log.info("started by wsl_wrapper: the client runs on Windows, the slot has no boinc_mmap_file")


def end(slot: Path, code: int) -> int:
    """Return ``code`` when the task succeeded; otherwise say why on stderr in one line (the
    finish file's message) and kill the process group (never returns)."""
    if code == 0:
        return 0
    finished = read_finish_file(slot)
    reason = finished.message if finished is not None and finished.message else f"see {LOG_FILE}"
    log.error("the task failed (exit code %d); ending the process group so wsl_wrapper reports it", code)
    sys.stderr.write(f"boincvm: the task failed with exit code {code}: {reason[:500]}\n")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.killpg(os.getpgrp(), signal.SIGKILL)
    return code  # not reached


def wait_out(slot: Path, later: TemporaryExit) -> None:
    """Sleep the temporary exit's delay (at most :data:`MAX_WAIT`), then let the task run again."""
    (slot / TEMPORARY_EXIT_FILE).unlink(missing_ok=True)
    delay = min(float(later.delay), MAX_WAIT)
    log.info("temporary exit (%s): running the task again in %.0f s", later.reason, delay)
    time.sleep(delay)


__all__ = ["LOG_FILE", "MAX_WAIT", "end", "log_to_slot", "wait_out"]
