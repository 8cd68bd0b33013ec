"""The guest program's output while it runs: a file beside the job's directory, whose tail
every progress survey hands over.

qemu-ga's ``guest-exec`` returns what it captured of a program's output only once the
program has ended (and keeps only its first 16 MiB), so a live view would stay blank. The
wrapper therefore starts the program through :data:`LAUNCH_SCRIPT`, which appends its
stdout and stderr to :func:`output_path`: a file in the wrapper's own guest directory,
beside the job's directory (on the same file system, writable by the same user), never
inside it, so it is never copied out as a result nor mistaken for one of the program's
files. For a container image (:mod:`boincvm.image.container`) the launcher runs outside
the container root and the program, chrooted by ``oci-run``, inherits the open file.

The tail rides the survey the wrapper runs at each progress report anyway
(:data:`~.guest_contract.SURVEY_SCRIPT`, a negative size): one ``tail`` forked in the
guest, no agent call of its own, so every backend has it (VMware too, with no extra
``vmrun`` call). Measured under TCG (30 surveys each way), the tail added 11 to 14 ms of
QEMU's CPU to a survey of about 50 to 70 ms, half a percent of a core at one survey every
2 s; a ``guest-exec`` of its own would cost 24 ms (14/26/36 ms min/median/max wall).

The file lives in the VM: a VM checkpoint restores it with the program, which goes on
appending; a program started again (app-level checkpoints) appends too. Where it cannot
be written the launcher leaves the output to the guest tools, and the wrapper uses what
they captured at the program's end, as it does for a program restored from a checkpoint
an older wrapper took (a guest without ``tail`` shows no output). Everything is bounded:
a survey reads at most :data:`OUTPUT_READ_BYTES`, the file is emptied every
:data:`TRIM_PERIOD` once it holds more than :data:`OUTPUT_CAP_BYTES`, and the lines shown
are cut and cleared of control characters.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import AnyStr

from boincvm.hypervisor.base import Backend, ProcessStatus
from boincvm.wrapper.guest_contract import GuestFileKind, Survey, escape_controls

log = logging.getLogger(__name__)

#: The wrapper's guest directory is the job's directory with this appended.
GUEST_DIR_SUFFIX = ".wrapper"
#: The program's output file in it.
OUTPUT_FILE = "output.log"
#: Bytes of the output file's end each survey reads: the status file's lines and the
#: finish step's tail (2,000 characters) come from them.
OUTPUT_READ_BYTES = 4096
#: The status file carries this many of the latest output lines, each cut to this many characters.
STATUS_LINES = 5
STATUS_LINE_CHARS = 400
#: The output file is emptied once it holds more than this (what qemu-ga would have kept).
OUTPUT_CAP_BYTES = 16 * 1024 * 1024
#: Seconds between two looks at the output file's size.
TRIM_PERIOD = 300.0

#: Run by ``/bin/sh -c``: ``$1`` the output file, then the program's argv. The output goes
#: to the file when it can be created (``true``, not the special built-in ``:``, tries it:
#: a failed redirection of a special built-in would end the shell), else where it went.
LAUNCH_SCRIPT = r"""[ -d "${1%/*}" ] || mkdir -p "${1%/*}" 2>/dev/null
if true >>"$1"; then exec >>"$1" 2>&1; fi
shift
exec "$@"
"""

#: Run by ``/bin/sh -c``: ``$1`` the output file, ``$2`` the cap. Empties the file (the
#: program appends, so it goes on writing at the new end) when it holds more than the cap
#: and prints ``emptied``; never follows a link, never opens anything but a regular file.
TRIM_SCRIPT = r"""set -f
f=$1 cap=$2
{ [ -f "$f" ] && [ ! -L "$f" ]; } || exit 0
set -- $(ls -ln "$f" 2>/dev/null)
[ "${5:-0}" -gt "$cap" ] 2>/dev/null || exit 0
: >"$f" && echo emptied
"""

#: Terminal escape sequences (CSI, OSC, and two-character ones): dropped whole, since they
#: only colour or move the cursor.
_ESCAPE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])"  # ESC [ CSI, ESC ] OSC, ESC X
    r"|\x9b[0-?]*[ -/]*[@-~]"  # the one-byte CSI
)


def output_path(exec_dir: str) -> str:
    """The guest path of the program's output file, beside the job's directory ``exec_dir``."""
    base = exec_dir.rstrip("/") or "/boincvm"
    return f"{base}{GUEST_DIR_SUFFIX}/{OUTPUT_FILE}"


def launch_argv(output: str, argv: Sequence[str]) -> list[str]:
    """The guest command that runs ``argv`` with its output appended to ``output``."""
    return ["/bin/sh", "-c", LAUNCH_SCRIPT, "boincvm-launch", output, *argv]


def from_line_start(data: AnyStr, limit: int) -> AnyStr:
    """The end of ``data`` (bytes or text), at most ``limit`` long, starting at the start of a
    line: the line a cut would split is left out, unless it is the only one (its end is kept
    after ``...``). An item beyond ``limit`` tells whether a cut falls at the start of a line."""
    if len(data) <= limit:
        return data
    newline, dots = ("\n", "...") if isinstance(data, str) else (b"\n", b"...")
    kept = data[-limit:]
    if data[-limit - 1 : -limit] == newline:
        return kept
    _, found, whole = kept.partition(newline)
    return whole if found else dots + kept[3:]


def shown_line(line: str, limit: int = STATUS_LINE_CHARS) -> str:
    """One output line as a terminal would leave it: what follows its last carriage return
    (a progress counter rewritten in place), escape sequences dropped, tabs expanded, other
    control characters as ``?``, cut to ``limit`` characters (its start kept)."""
    line = line.rstrip("\r\n").rsplit("\r", 1)[-1]
    line = escape_controls(_ESCAPE.sub("", line).expandtabs(4)).rstrip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def last_lines(data: bytes, *, ended: bool, count: int = STATUS_LINES) -> str:
    """The last ``count`` non-blank lines of ``data`` (which starts at a line), made safe by
    :func:`shown_line`, newest last. While the program runs (``ended`` False) a line
    without its newline yet is being written and is left out."""
    if not ended:
        data = data[: data.rfind(b"\n") + 1]
    lines = (shown_line(line) for line in data.decode("utf-8", "replace").split("\n"))
    return "\n".join([line for line in lines if line.strip()][-count:])


class GuestOutput:
    """The output file of one task's program: how the program is started to write it, and
    its tail as the last survey read it.

    Attributes:
        path: the file's guest path.
        tail: the file's end as last read (at most :data:`OUTPUT_READ_BYTES`, from the
            start of a line), or empty when the program's output never reached the file.
    """

    def __init__(self, vm: Backend, exec_dir: str, clock: Callable[[], float]) -> None:
        self.vm = vm
        self.path = output_path(exec_dir)
        self.clock = clock
        self.tail = b""
        self._carry = b""  # the tail before the file was emptied, until the file holds enough again
        self._next_trim = clock() + TRIM_PERIOD

    def launch_argv(self, argv: Sequence[str]) -> list[str]:
        """The guest command that runs the program ``argv`` writing to the file."""
        return launch_argv(self.path, argv)

    def survey_entries(self) -> dict[str, int]:
        """The file's entry in a survey (:meth:`~.guest_files.GuestFiles.survey`): its last
        :data:`OUTPUT_READ_BYTES` and one byte more, which tells whether a line was cut."""
        return {self.path: -(OUTPUT_READ_BYTES + 1)}

    def take(self, survey: Survey, *, running: bool) -> None:
        """Keep the file's tail from ``survey`` (nothing changes when the survey has none);
        while the program runs, empty the file now and then when it has grown too large.

        Raises:
            GuestError, HypervisorError: the guest could not run the command that empties it.
        """
        data = survey.data.get(self.path) if survey.kind(self.path) is GuestFileKind.FILE else None
        if data is None:
            return
        if len(data) > OUTPUT_READ_BYTES:
            self._carry = b""
        self.tail = from_line_start(self._carry + data, OUTPUT_READ_BYTES)
        if running and self.clock() >= self._next_trim:
            self._next_trim = self.clock() + TRIM_PERIOD
            self._trim()

    def _trim(self) -> None:
        argv = ["/bin/sh", "-c", TRIM_SCRIPT, "boincvm-trim", self.path, str(OUTPUT_CAP_BYTES)]
        status = self.vm.run_program(argv, timeout=60)
        if status.succeeded and status.stdout_tail.strip() == b"emptied":
            # Lines written between the survey and now are lost; the ones before are kept.
            self._carry = self.tail
            log.info("the guest program's output file had grown past %d bytes; emptied it", OUTPUT_CAP_BYTES)

    def recent(self, status: ProcessStatus) -> str:
        """The latest output lines for the status file: the file's, else the guest tools' capture."""
        data = self.tail or from_line_start(status.stdout_tail or status.stderr_tail, OUTPUT_READ_BYTES)
        return last_lines(data, ended=not status.running)

    def final(self, status: ProcessStatus) -> tuple[bytes, bytes]:
        """The program's output for the finish step's tail: the file's end, then whatever the
        guest tools captured (stdout, stderr: only the launcher's when the file was written)."""
        return self.tail + status.stdout_tail, status.stderr_tail


__all__ = [
    "LAUNCH_SCRIPT",
    "OUTPUT_CAP_BYTES",
    "OUTPUT_READ_BYTES",
    "STATUS_LINES",
    "TRIM_PERIOD",
    "TRIM_SCRIPT",
    "GuestOutput",
    "from_line_start",
    "last_lines",
    "launch_argv",
    "output_path",
    "shown_line",
]
