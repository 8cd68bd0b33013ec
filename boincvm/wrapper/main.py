"""The wrapper's entry point: what the BOINC client starts in a slot directory.

``main`` reads the slot (init_data.xml, the vm job files through their soft links), runs
:class:`~boincvm.wrapper.steps.Wrapper` and returns the exit code. It logs to stderr, which the
client keeps as ``stderr.txt``; it never needs a terminal. It is the ``__main__`` of the
wrapper zip application that ``package-image`` ships, and ``boincvm wrapper`` runs it too.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from boincvm import __version__
from boincvm.boinc.api import BoincApp, slot_locked_exit
from boincvm.boinc.errors import SlotLocked
from boincvm.boinc.files import ExitCode, read_temporary_exit, write_finish_file
from boincvm.errors import BoincvmError, InputError
from boincvm.wrapper import bundle_dirs, memory, self_unpack, wsl_mode

if TYPE_CHECKING:
    from boincvm.wrapper.steps import WrapperInputs

# The job, the backends and the steps are imported once the BOINC API ticks (in _run and
# load_inputs): the client's first heartbeat is read about 60 ms earlier that way.

log = logging.getLogger("boincvm.wrapper")
#: Seconds between ticks of the BOINC API by its own thread (status and heartbeats are
#: once a second; the main loop ticks as well, every LOOP_SLEEP, while the program runs).
TICK_PERIOD = 0.5

#: Options the client or a plan class may put before the workunit's arguments.
_OWN_OPTIONS = ("--nthreads", "--device", "--memory_size_mb")
#: Bounds of ``--nthreads`` and ``--memory_size_mb`` (a VM larger than this is a typo).
MAX_NCPUS = 1024
MAX_MEMORY_MB = 16 * 1024 * 1024


def split_args(argv: Sequence[str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """Separate the wrapper's own options (``--nthreads N`` ...) from the workunit's arguments."""
    own: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _OWN_OPTIONS and i + 1 < len(argv):
            own[argv[i].lstrip("-")] = argv[i + 1]
            i += 2
            continue
        rest.append(argv[i])
        i += 1
    return own, tuple(rest)


def load_inputs(app: BoincApp, wu_args: tuple[str, ...], own: dict[str, str]) -> WrapperInputs:
    """Read and merge the vm job files and resolve every file the job names.

    Raises:
        InputError, XmlError: a job file is missing or invalid, or a file it names is missing.
    """
    from boincvm.bounds import parse_number
    from boincvm.job import DEFAULTS_OPEN_NAME, JOB_OPEN_NAME, VmJob, load_job, resolve
    from boincvm.wrapper.steps import WrapperInputs

    job = VmJob()
    defaults = app.resolve(DEFAULTS_OPEN_NAME)
    if defaults.exists():
        job = load_job(defaults)
    wu_job_path = app.resolve(JOB_OPEN_NAME)
    if not wu_job_path.exists():
        raise InputError(
            f"the workunit has no {JOB_OPEN_NAME}", hint="make workunits with boincvm make-workunit"
        )
    job = job.merged(load_job(wu_job_path))
    # The client or a plan class puts these on the command line: untrusted numbers.
    if "nthreads" in own:
        ncpus = parse_number(own["nthreads"], "--nthreads", low=1, high=MAX_NCPUS)
        job = dataclasses.replace(job, ncpus=int(ncpus))
    if "memory_size_mb" in own:
        memory = parse_number(own["memory_size_mb"], "--memory_size_mb", low=1, high=MAX_MEMORY_MB)
        job = dataclasses.replace(job, memory_mb=int(memory))
    resolved = resolve(job)

    def existing(logical: str | None, what: str) -> Path | None:
        if logical is None:
            return None
        path = app.resolve(logical)
        if not path.is_file():
            raise InputError(f"{what} {logical!r} is not in the slot ({path} is missing)")
        return path

    inputs = tuple(
        (existing(f.open_name, "input file") or Path(), f.guest_path) for f in resolved.input_files
    )
    image_files = tuple(
        (f.file_name, existing(f.open_name, "image file") or Path()) for f in resolved.image_files
    )
    return WrapperInputs(
        job=resolved,
        wu_args=wu_args,
        kernel=existing(resolved.vm_kernel, "kernel"),
        initrd=existing(resolved.vm_initrd, "initrd"),
        image=existing(resolved.vm_image, "image"),
        package=existing(resolved.package.file_name if resolved.package else None, "package"),
        inputs=inputs,
        image_files=image_files,
    )


def _check_package(path: Path) -> None:
    """Refuse a hostile package before anything reaches the guest (when the checker is available)."""
    try:
        # An optional part: a wrapper built without the package checker (and its rpmfile)
        # still runs; this is no circle, main is the top of the wrapper.
        from boincvm.package import check_package
    except ImportError:
        return
    from boincvm.findings import errors_in, has_errors

    findings = list(check_package(path))
    if has_errors(findings):
        bad = errors_in(findings)[0]
        raise InputError(f"the package was refused: {bad}", hint=bad.hint)


def _sigterm(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001 - signal handler API
    raise KeyboardInterrupt  # unwinds through the wrapper's finally blocks, which stop the VM


def _log_init_failure(exc: BoincvmError) -> None:
    # The 7.20.5 client reports a non-zero exit with stderr.txt only (the finish file's
    # message goes nowhere), so the reason and the hint must be written there.
    log.error("%s%s", exc.message, f" (hint: {exc.hint})" if exc.hint else "")


#: What ``MAIN --version`` prints (the first word names the program, as the frozen file does).
VERSION_LINE = f"boincvm-wrapper {__version__}"


def _follow_bootloader() -> None:
    """In the frozen wrapper, die with the process the client started.

    PyInstaller's one-file bootloader unpacks the bundle and runs Python in a child process;
    the client (and run-local) know only the bootloader's pid. A SIGKILL of the bootloader
    cannot be forwarded, so without this the child, and the VM it drives, would run on
    orphaned. With it, killing the main program kills the wrapper (and QEMU follows through
    its own pdeathsig) exactly as it does for the zip application.
    """
    unpacked = getattr(sys, "_MEIPASS", None)
    if not getattr(sys, "frozen", False) or unpacked is None or not sys.platform.startswith("linux"):
        return
    if not Path(unpacked).name.startswith("_MEI"):
        return  # not a one-file build: no bootloader process above us
    import ctypes
    import os

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    # The parent must still be the bootloader (the same executable): if it died before
    # prctl took effect, we were already handed to another process and nobody waits for us.
    try:
        alive = Path(f"/proc/{os.getppid()}/exe").resolve() == Path(sys.executable).resolve()
    except OSError:
        alive = False
    if not alive:
        os._exit(int(ExitCode.INIT_FAILURE))
    if "STATICX_BUNDLE_DIR" in os.environ:
        _follow_staticx(os.getppid())


def _start_time(pid: int) -> tuple[int, str] | None:
    """A process's parent and start time (``/proc/PID/stat`` fields 4 and 22), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]), fields[19]


def _follow_staticx(bootloader: int) -> None:
    """Under staticx, die with the process the client started, two levels up.

    staticx's static loader unpacks the libraries and runs PyInstaller's bootloader as its
    child, which runs Python as its child: the client knows only staticx's pid, and the
    pdeathsig above follows PyInstaller's bootloader, which a SIGKILL of staticx leaves
    running. A thread waits on a pidfd of staticx's process (a poll of ``/proc`` every
    0.1 s where pidfds are missing) and kills this process the moment it is gone, so the
    wrapper dies as it would have from the client's SIGKILL (no checkpoint record touched)
    and QEMU follows through its own pdeathsig.
    """
    parent = _start_time(bootloader)
    top = parent[0] if parent else 1
    started = _start_time(top)
    if parent is None or top <= 1 or started is None:
        os._exit(int(ExitCode.INIT_FAILURE))  # staticx is gone already: nobody waits for us

    def watch() -> None:
        try:
            fd = os.pidfd_open(top)
        except (AttributeError, OSError):
            while _start_time(top) == started:
                time.sleep(0.1)
        else:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while not poller.poll(None):
                pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="follow-staticx", daemon=True).start()


class Form(enum.Enum):
    """How this wrapper runs (the frozen forms start at different speeds), as its first log
    line names it."""

    HOST_PYTHON = "on the host's Python"
    STATIC = "static executable (unpacks itself at every start)"
    RUNTIME = "from the wrapper's runtime (unpacked once per host)"

    @classmethod
    def current(cls) -> Form:
        if not getattr(sys, "frozen", False):
            return cls.HOST_PYTHON
        return cls.STATIC if "STATICX_BUNDLE_DIR" in os.environ else cls.RUNTIME


def main(argv: Sequence[str] | None = None) -> int:
    """Run the wrapper in the current directory (a BOINC slot); return the exit code.

    ``--version`` as the only argument prints :data:`VERSION_LINE` on stdout and returns 0
    before anything reads or writes the current directory.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        sys.stdout.write(VERSION_LINE + "\n")
        return 0
    _follow_bootloader()
    memory.keep_heap_small()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=wsl_mode.LOG_FORMAT, datefmt=wsl_mode.LOG_DATE_FORMAT
    )
    signal.signal(signal.SIGTERM, _sigterm)
    unpacking = self_unpack.start_unpacking()  # the launcher started the static wrapper
    code = _run_task(args)
    if unpacking is not None:
        self_unpack.finish(unpacking)  # not after a SIGTERM or a crash: those end at once
    return code


def _run_task(args: list[str]) -> int:
    """Run the task in the current directory (again and again behind wsl_wrapper, where a
    temporary exit is waited out in place); return the exit code."""
    own, wu_args = split_args(args)
    slot = Path.cwd()
    while True:
        code, wsl = run_once(slot, own, wu_args)
        if not wsl:
            return code
        later = read_temporary_exit(slot)
        if later is None:
            return wsl_mode.end(slot, code)
        wsl_mode.wait_out(slot, later)


@functools.cache  # once per process: behind wsl_wrapper a process runs the task again and again
def _first_run_started() -> None:
    """Once where the log goes is known: name the form that runs, and remove what staticx
    left behind for killed wrappers."""
    form = Form.current()
    log.info("%s, %s", VERSION_LINE, form.value)
    if form is Form.STATIC:
        bundle_dirs.tidy(Path(os.environ["STATICX_BUNDLE_DIR"]))
    elif form is Form.RUNTIME:  # no staticx of its own: tidy what killed static starts left
        bundle_dirs.remove_abandoned_in(Path(os.environ.get("TMPDIR") or "/tmp"))


def run_once(slot: Path, own: dict[str, str], wu_args: tuple[str, ...]) -> tuple[int, bool]:
    """One run of the task in ``slot``: (the exit code, whether wsl_wrapper started us)."""
    try:
        app = BoincApp.start(slot)
    except SlotLocked as err:
        return slot_locked_exit(slot, err), False
    except BoincvmError as exc:
        _log_init_failure(exc)
        write_finish_file(slot, int(ExitCode.INIT_FAILURE), exc.message)
        return int(ExitCode.INIT_FAILURE), False
    if app.behind_wsl_wrapper:
        wsl_mode.log_to_slot(slot)
    # The main loop ticks at each turn; this thread covers the long steps (snapshots, copies).
    with app.ticking(TICK_PERIOD):
        _first_run_started()
        return _run(app, own, wu_args), app.behind_wsl_wrapper


def _run(app: BoincApp, own: dict[str, str], wu_args: tuple[str, ...]) -> int:
    from boincvm.hypervisor.base import backend_class
    from boincvm.wrapper.steps import Wrapper

    try:
        inputs = load_inputs(app, wu_args, own)
        if inputs.package is not None:
            _check_package(inputs.package)
        factory = backend_class(inputs.job.backend)
    except BoincvmError as exc:
        _log_init_failure(exc)
        return app.finish(int(ExitCode.INIT_FAILURE), exc.message)
    try:
        return Wrapper(app, inputs, factory).run()
    except KeyboardInterrupt:
        log.warning("terminated; the VM was stopped")
        return app.exit_quit()


if __name__ == "__main__":
    sys.exit(main())
