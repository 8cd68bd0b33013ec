"""``vmrun``, VIX's command-line face: finding it, calling it, and reading its answers.

Every call is an argument list (no shell) with a timeout, through :func:`boincvm.proc.run`.
Guest and VM passwords are passed as ``secrets`` so they never reach a log line or an
error message. vmrun reports failures as ``Error: <VIX text>`` on *stdout* and exits with
-1 (255 on POSIX); :func:`classify` turns that text into one of our errors. VIX error texts
are localisable, so matching is on the English texts and falls back to a generic
:class:`VmrunError` that carries the text.

Grammar (vmrun 1.17)::

    vmrun [-T ws|fusion|player] [-vp PW] [-gu USER] [-gp PW] COMMAND [VMX] [PARAMETERS]
"""

from __future__ import annotations

import enum
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from boincvm import proc
from boincvm.errors import (
    BoincvmError,
    CommandFailed,
    CommandNotFound,
    GuestError,
    GuestProgramFailed,
    GuestToolsMissing,
    HypervisorError,
    HypervisorUnavailable,
    OutputError,
    UnsupportedOperation,
    VmTimeout,
)

HOST_TYPES = ("ws", "fusion", "player")
DEFAULT_CALL_TIMEOUT = 120.0


class HostType(enum.StrEnum):
    """vmrun's ``-T`` values (1.17 dropped ``server``, ``esx``, ``vc`` and ``ws-shared``)."""

    WS = "ws"
    FUSION = "fusion"
    PLAYER = "player"


# -- errors ------------------------------------------------------------------------------


class VmrunError(HypervisorError):
    """vmrun failed in a way that has no more specific class; ``output`` is its text."""

    def __init__(
        self, message: str, *, output: str = "", returncode: int | None = None, hint: str | None = None
    ):
        super().__init__(message, hint=hint)
        self.output = output
        self.returncode = returncode


class WrongHostType(HypervisorUnavailable):
    """vmrun cannot reach the product named by ``-T`` (e.g. ``ws`` where only Player is installed)."""


class VmNotRunning(HypervisorError):
    """The operation needs a powered-on VM and this one is off."""


class SnapshotNotFound(HypervisorError):
    """No snapshot of that name exists."""


class GuestFileMissing(OutputError):
    """A guest file (or a host file for a copy) was not found."""


class GuestCredentialsRejected(GuestError):
    """The guest refused the user name and password (or the account cannot log in)."""


class GuestExit(GuestProgramFailed):
    """A blocking ``runProgramInGuest`` ended with a non-zero exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Failure(enum.StrEnum):
    """What a failed vmrun call means, from its output text (reference §1.4, §2.5)."""

    GUEST_EXIT = "guest-exit"
    NOT_RUNNING = "not-running"
    TOOLS = "tools-not-running"
    AUTH = "bad-credentials"
    ENCRYPTED = "vm-password-required"
    FILE_NOT_FOUND = "file-not-found"
    VM_NOT_FOUND = "vm-not-found"
    SNAPSHOT_NOT_FOUND = "snapshot-not-found"
    NOT_SUPPORTED = "not-supported"
    PROVIDER = "wrong-host-type"
    DIALOG = "blocking-dialog"
    BUSY = "busy"
    OTHER = "other"


# Order matters: the first match wins (reference §1.4's recommended order, extended).
_PATTERNS: tuple[tuple[Failure, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(rx, re.IGNORECASE))
    for kind, rx in (
        (Failure.GUEST_EXIT, r"non-zero exit code:\s*(-?\d+)"),
        (Failure.ENCRYPTED, r"password is required for this operation"),
        (Failure.NOT_RUNNING, r"is not powered on|virtual machine is not running|VM is not running"),
        (Failure.TOOLS, r"Tools are not running|Anonymous guest operations are not allowed"),
        (
            Failure.AUTH,
            r"user name or password|cannot authenticate|empty password|"
            r"must be logged in interactively|guest operations.*root|Insufficient permissions",
        ),
        (Failure.SNAPSHOT_NOT_FOUND, r"snapshot.*(not found|does not exist)|Invalid snapshot name"),
        (Failure.VM_NOT_FOUND, r"Cannot open VM|virtual machine cannot be found|unknown file suffix"),
        (Failure.FILE_NOT_FOUND, r"file was not found|file does not exist|No such file"),
        (Failure.PROVIDER, r"VIX_SERVICEPROVIDER|service provider|Unable to connect to host"),
        (Failure.DIALOG, r"dialog|requires user interaction"),
        (Failure.BUSY, r"object is busy|Waiting for Command execution Available"),
        (Failure.NOT_SUPPORTED, r"not supported"),
    )
)


def classify(output: str) -> tuple[Failure, str]:
    """Say what a failed vmrun call's output means, and return the error line to show.

    The shown line is the ``Error: ...`` line without its prefix (or the last non-empty line).
    """
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    shown = next((ln[len("Error:") :].strip() for ln in lines if ln.startswith("Error:")), None)
    if shown is None:
        shown = lines[-1] if lines else "no output"
    for kind, rx in _PATTERNS:
        if rx.search(output):
            return kind, shown
    return Failure.OTHER, shown


#: The error class of each failure that has one, with its hint (None: the class's own).
_SPECIFIC: dict[Failure, tuple[type[BoincvmError], str | None]] = {
    Failure.NOT_RUNNING: (VmNotRunning, None),
    Failure.TOOLS: (GuestToolsMissing, "wait for the VMware Tools (checkToolsState 'running') first"),
    Failure.AUTH: (
        GuestCredentialsRejected,
        "check the guest user and password; the account needs a non-empty password",
    ),
    Failure.FILE_NOT_FOUND: (GuestFileMissing, None),
    Failure.SNAPSHOT_NOT_FOUND: (SnapshotNotFound, None),
    Failure.NOT_SUPPORTED: (UnsupportedOperation, None),
    Failure.PROVIDER: (WrongHostType, "choose host_type ws, fusion or player to match the product"),
}
#: Hints for failures that stay a :class:`VmrunError` (which keeps vmrun's output).
_VMRUN_HINTS: dict[Failure, str] = {
    Failure.ENCRYPTED: "the VM is encrypted: set vm_password_file, or ship an unencrypted VM",
    Failure.VM_NOT_FOUND: "check the .vmx path",
    Failure.DIALOG: 'a VMware dialog is waiting; set msg.autoAnswer = "TRUE"',
}


def error_for(command: str, output: str, returncode: int | None) -> BoincvmError:
    """Build the error a failed vmrun ``command`` should raise, from its output and exit code."""
    kind, shown = classify(output)
    if kind is Failure.GUEST_EXIT:
        m = _PATTERNS[0][1].search(output)
        code = int(m.group(1)) if m else -1
        return GuestExit(f"vmware: guest program exited with code {code}", code)
    msg = f"vmware: vmrun {command}: {shown}"
    if kind in _SPECIFIC:
        cls, hint = _SPECIFIC[kind]
        return cls(msg, hint=hint)
    return VmrunError(msg, output=output, returncode=returncode, hint=_VMRUN_HINTS.get(kind))


# -- discovery -----------------------------------------------------------------------------


def default_locations() -> list[Path]:
    """Where VMware installs vmrun on this platform (reference §1.1), most likely first."""
    if sys.platform == "darwin":
        app = Path("/Applications/VMware Fusion.app/Contents")
        return [app / "Library" / "vmrun", app / "Public" / "vmrun"]
    if sys.platform == "win32":
        found: list[Path] = []
        try:
            import winreg

            for key in (
                r"SOFTWARE\WOW6432Node\VMware, Inc.\VMware Workstation",
                r"SOFTWARE\VMware, Inc.\VMware Workstation",
            ):
                try:
                    with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key) as k:
                        found.append(Path(str(winreg.QueryValueEx(k, "InstallPath")[0])) / "vmrun.exe")
                except OSError:
                    continue
        except ImportError:
            pass
        for env in ("ProgramFiles(x86)", "ProgramFiles"):
            base = os.environ.get(env)
            if base:
                found += [
                    Path(base, "VMware", "VMware Workstation", "vmrun.exe"),
                    Path(base, "VMware", "VMware VIX", "vmrun.exe"),
                ]
        return found
    return [Path("/usr/bin/vmrun"), Path("/usr/local/bin/vmrun")]


def find_vmrun(explicit: str | None = None) -> Path | None:
    """Locate vmrun: ``explicit``, then ``$BOINCVM_VMRUN``, then PATH, then the install locations."""
    for cand in (explicit, os.environ.get("BOINCVM_VMRUN")):
        if cand:
            p = Path(cand)
            return p if p.is_file() else None
    on_path = proc.which("vmrun")
    if on_path is not None:
        return on_path
    return next((p for p in default_locations() if p.is_file()), None)


def default_host_type() -> HostType:
    """``fusion`` on macOS, ``ws`` elsewhere."""
    return HostType.FUSION if sys.platform == "darwin" else HostType.WS


# -- output parsers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestProcEntry:
    """One line of ``listProcessesInGuest``."""

    pid: int
    owner: str
    cmd: str


def parse_list(text: str) -> list[str]:
    """The .vmx paths of ``vmrun list`` (``Total running VMs: N`` then one path a line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return [ln for ln in lines if not ln.startswith("Total running VMs")]


def parse_snapshots(text: str) -> list[str]:
    """Snapshot names from ``listSnapshots`` (``Total snapshots: N`` then one name a line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return [ln for ln in lines if not ln.startswith("Total snapshots")]


_PROC = re.compile(r"^pid=(\d+),\s*owner=(.*?),\s*cmd=(.*)$")


def parse_processes(text: str) -> list[GuestProcEntry]:
    """``listProcessesInGuest`` output: ``Process list: N`` then ``pid=.., owner=.., cmd=..`` lines."""
    out = []
    for ln in text.splitlines():
        m = _PROC.match(ln.strip())
        if m:
            out.append(GuestProcEntry(int(m.group(1)), m.group(2), m.group(3)))
    return out


def parse_version(text: str) -> str | None:
    """The version in vmrun's banner (``vmrun version 1.17.0 build-NNN``)."""
    m = re.search(r"vmrun version ([0-9.]+)", text)
    return m.group(1) if m else None


def redact(text: str, secrets: Sequence[str]) -> str:
    """Replace every secret in ``text`` by ``***``."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


# -- the transport -------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestLogin:
    """Guest credentials for guest operations. ``repr`` hides the password."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Vmrun:
    """A located vmrun and how to call it.

    Attributes:
        path: the vmrun executable.
        host_type: the ``-T`` value.
        vm_password: the ``-vp`` password of an encrypted VM, or None.
        timeout: default seconds for one call.
    """

    path: Path
    host_type: HostType = HostType.WS
    vm_password: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_CALL_TIMEOUT

    def argv(
        self, command: str, vmx: Path | None, params: Sequence[str] = (), login: GuestLogin | None = None
    ) -> list[str]:
        """The argument list for one call, flags first as vmrun requires."""
        argv = [str(self.path), "-T", self.host_type.value]
        if self.vm_password is not None:
            argv += ["-vp", self.vm_password]
        if login is not None:
            argv += ["-gu", login.user, "-gp", login.password]
        argv.append(command)
        if vmx is not None:
            argv.append(str(vmx))
        argv += list(params)
        return argv

    def secrets(self, login: GuestLogin | None) -> list[str]:
        """Strings to redact from logs for a call."""
        return [s for s in (self.vm_password, login.password if login else None) if s]

    def call(
        self,
        command: str,
        vmx: Path | None = None,
        params: Sequence[str] = (),
        *,
        login: GuestLogin | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> proc.Completed:
        """Run ``vmrun COMMAND VMX PARAMS`` and return what it printed.

        Raises:
            HypervisorUnavailable: vmrun is not installed where it was found.
            VmTimeout: it did not finish within ``timeout``.
            BoincvmError: (with ``check``) the error :func:`error_for` picks for its output.
        """
        secrets = self.secrets(login)
        limit = self.timeout if timeout is None else timeout
        try:
            done = proc.run(
                self.argv(command, vmx, params, login), timeout=limit, check=False, secrets=secrets
            )
        except CommandNotFound as exc:
            raise HypervisorUnavailable(
                f"vmware: vmrun not found at {self.path}", hint=proc.INSTALL_HINTS["vmrun"]
            ) from exc
        except CommandFailed as exc:
            raise VmTimeout(
                f"vmware: vmrun {command} did not finish within {limit:g} s",
                hint="a VMware dialog may be waiting for an answer (msg.autoAnswer)",
            ) from exc
        if check and done.returncode != 0:
            text = redact(done.text + "\n" + done.stderr.decode("utf-8", "replace"), secrets)
            raise error_for(command, text, done.returncode)
        return done

    def version(self) -> str | None:
        """vmrun's version from its banner, or None if it prints none."""
        try:
            done = proc.run([str(self.path)], timeout=30, check=False)
        except (CommandNotFound, CommandFailed):
            return None
        return parse_version(done.text)
