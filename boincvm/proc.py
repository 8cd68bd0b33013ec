"""The single subprocess seam: every external program boincvm runs goes through here.

Commands are argument lists (never a shell), every call has a timeout, the command is
logged at debug level, and failures raise :class:`~boincvm.errors.CommandFailed` with the
command, exit code and the tail of stderr.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from boincvm.errors import CommandFailed, CommandNotFound

log = logging.getLogger(__name__)

Arg = str | os.PathLike[str]

#: Hints for programs users commonly lack, shown when they are not found.
INSTALL_HINTS: dict[str, str] = {
    "qemu-img": "install qemu-utils (Debian/Ubuntu: apt-get install qemu-utils)",
    "qemu-system-x86_64": "install QEMU (Debian/Ubuntu: apt-get install qemu-system-x86)",
    "rpmbuild": "install rpm (Debian/Ubuntu: apt-get install rpm)",
    "rpm": "install rpm (Debian/Ubuntu: apt-get install rpm)",
    "gcc": "install gcc (Debian/Ubuntu: apt-get install gcc)",
    "ar": "install binutils (Debian/Ubuntu: apt-get install binutils)",
    "vmrun": "install VMware Workstation or Fusion, or put vmrun on PATH",
}

STDERR_TAIL_LINES = 20

#: The client's ``LD_LIBRARY_PATH`` as the frozen wrapper's launcher found it (empty: unset),
#: kept for the programs the wrapper runs (:func:`child_env`).
HOST_LIBRARY_PATH = "BOINCVM_HOST_LD_LIBRARY_PATH"
#: What the launcher sets when it falls back to the static wrapper: the wrapper's runtime
#: archive, for the static wrapper to unpack for the starts after this one (it is removed
#: from the environment before any child starts: ``boincvm.wrapper.self_unpack``).
WRAPPER_RUNTIME_ENV = "BOINCVM_WRAPPER_RUNTIME"


@dataclass(frozen=True)
class Completed:
    """What a finished command left behind."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        """Standard output decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")


def tail(data: bytes | str, lines: int = STDERR_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of ``data`` as text."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _argv(cmd: Sequence[Arg]) -> list[str]:
    return [os.fspath(c) for c in cmd]


def which(name: str) -> Path | None:
    """Locate an executable on PATH."""
    found = shutil.which(name)
    return Path(found) if found else None


#: Where Debian keeps administrators' tools, often not on an ordinary user's PATH.
SBIN_DIRS = ("/usr/sbin", "/sbin")


def system_tool(name: str) -> str:
    """The program to run for an administrator's tool (``mkfs.ext4``, ``debugfs``): found on
    PATH or in :data:`SBIN_DIRS`, else the bare name, so that :func:`run` raises
    :class:`~boincvm.errors.CommandNotFound` with a hint."""
    found = which(name)
    if found:
        return str(found)
    for d in SBIN_DIRS:
        if Path(d, name).is_file():
            return str(Path(d, name))
    return name


def child_env(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    """The environment of a program boincvm runs: this one with ``extra`` (None: this one as it is).

    A frozen boincvm runs with ``LD_LIBRARY_PATH`` pointing into its own bundle: PyInstaller
    prepends its library directory, and the wrapper's launcher puts the runtime's glibc
    first. The programs it runs get the host's path back (the launcher's record of it, else
    PyInstaller's ``LD_LIBRARY_PATH_ORIG``), so none of them loads a library of the bundle.
    """
    frozen = getattr(sys, "frozen", False)
    if not frozen and extra is None:
        return None
    env = dict(os.environ)
    if frozen:
        host = env.pop(HOST_LIBRARY_PATH, None)
        before = env.pop("LD_LIBRARY_PATH_ORIG", None)
        original = host if host is not None else before
        if original:
            env["LD_LIBRARY_PATH"] = original
        else:
            env.pop("LD_LIBRARY_PATH", None)
    return {**env, **(extra or {})}


def run(
    cmd: Sequence[Arg],
    *,
    timeout: float,
    check: bool = True,
    input: bytes | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    secrets: Sequence[str] = (),
) -> Completed:
    """Run a command to completion and capture its output.

    Args:
        cmd: the program and its arguments.
        timeout: seconds after which the command is killed.
        check: raise when the exit code is not 0.
        input: bytes for standard input (otherwise stdin is /dev/null).
        cwd: working directory.
        env: extra environment variables, added to the current environment.
        secrets: strings (passwords) replaced by ``***`` wherever the command is logged or reported.

    Raises:
        CommandNotFound: the program is not installed.
        CommandFailed: it exited non-zero (with ``check``) or ran past ``timeout``.
    """
    argv = _argv(cmd)
    shown = _redact(argv, secrets)
    log.debug("+ %s", shlex.join(shown))
    full_env = child_env(env)
    try:
        proc = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            cwd=cwd,
            env=full_env,
            check=False,
        )
    except FileNotFoundError as exc:
        name = Path(argv[0]).name
        raise CommandNotFound(
            f"{name} was not found", hint=INSTALL_HINTS.get(name, f"install {name} or put it on PATH")
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(
            shown,
            None,
            tail(exc.stderr or b""),
            message=f"{Path(argv[0]).name} did not finish within {timeout:g} s",
        ) from exc
    done = Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandFailed(shown, proc.returncode, _redact_text(tail(proc.stderr or proc.stdout), secrets))
    return done


def spawn(
    cmd: Sequence[Arg],
    *,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.DEVNULL,
    log_file: Path | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
    pass_fds: Sequence[int] = (),
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-lived process (a VM, the wrapper) and return its handle.

    The caller owns the process and must wait for or kill it. With ``log_file`` both
    output streams are appended to that file. ``die_with_parent``: the process gets SIGKILL
    when the thread that started it ends (Linux's parent-death signal, set in the child
    before it runs the program), so it cannot outlive a killed caller.

    Raises:
        CommandNotFound: the program is not installed.
    """
    argv = _argv(cmd)
    log.debug("& %s", shlex.join(argv))
    full_env = child_env(env)
    sink = None
    try:
        if log_file is not None:
            sink = log_file.open("ab")
            stdout = stderr = sink.fileno()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=full_env,
            start_new_session=new_session,
            pass_fds=tuple(pass_fds),
            preexec_fn=_parent_death_signal() if die_with_parent else None,  # noqa: PLW1509
        )
    except FileNotFoundError as exc:
        name = Path(argv[0]).name
        raise CommandNotFound(
            f"{name} was not found", hint=INSTALL_HINTS.get(name, f"install {name} or put it on PATH")
        ) from exc
    finally:
        if sink is not None:
            sink.close()


#: prctl's PR_SET_PDEATHSIG.
_PR_SET_PDEATHSIG = 1


def _parent_death_signal() -> Callable[[], None]:
    """The function a child runs between fork and exec to die with the thread that forked it.

    Done in the child itself rather than through util-linux's ``setpriv --pdeathsig``:
    the host may have no setpriv, or busybox's, which has no such option (Alpine, the
    distro BOINC's Windows installer sets up). Everything is looked up before the fork; the
    child only calls prctl and getppid. A parent gone before prctl took effect would leave
    the child unwatched, so the child then exits at once.
    """
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    getppid, exit_now = os.getppid, os._exit

    def set_in_child() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0 or getppid() != parent:
            exit_now(127)

    return set_in_child


def _redact(argv: list[str], secrets: Sequence[str]) -> list[str]:
    return [_redact_text(a, secrets) for a in argv]


def _redact_text(text: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text
