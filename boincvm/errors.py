"""The one error tree of boincvm.

Every error a user can cause or meet derives from :class:`BoincvmError`. Each class
carries the process exit code the CLI maps it to (in one place, ``boincvm.cli``) and an
optional hint that tells the user what to do. Domain code raises these; it never prints
and never exits.

Exit codes (documented in the README):

====  ======================================================================
code  meaning
====  ======================================================================
0     success (``validate``: everything is valid)
1     internal error (a bug: please report it with ``--debug`` output)
2     command-line usage error (click)
3     bad input: malformed or unsafe XML, missing file, checksum mismatch,
      a path that escapes its directory, unreadable package, a number that is
      NaN/infinite/out of range, a FIFO or device where a file belongs, text in
      the wrong encoding, an output directory that would destroy an input, and
      operating-system errors on a path the user named (ENOENT, ENOTDIR,
      EACCES, EISDIR, EROFS, ENOSPC, ...)
4     ``validate`` found problems (the findings are printed / in ``--json``)
5     an external tool is missing or failed (qemu-img, rpmbuild, vmrun, ...)
6     hypervisor error: backend unavailable, VM failed to start or stopped
7     guest error: guest tools missing or silent, install failed, program
      failed, output missing or too big
8     the workunit failed under run-local (BOINC outcome in the summary)
9     run-local's client could not set up or run the task: a missing task file,
      a client time-out (``ClientError``, :mod:`boincvm.boinc.errors`)
10    run-local ran the workunit to success, but a fault it was asked to inject never
      happened (the run ended before its point); the summary says why
196   the wrapper (the app version's main program, not the CLI) refused the job before the
      VM started: the slot's file system is smaller than the job's disk need
      (``EXIT_DISK_LIMIT_EXCEEDED``, the BOINC task's exit status)
198   the wrapper refused the job before the VM started: it needs more memory than the
      host has in all (``EXIT_MEM_LIMIT_EXCEEDED``). A shortage of *free* memory or disk,
      or a job with ``<vm_accel_required/>`` on a host without usable KVM, is a temporary
      exit instead (exit 0 and ``boinc_temporary_exit``): the client retries later
130   interrupted (Ctrl-C)
143   terminated by SIGTERM (129 SIGHUP); partial artefacts were removed
====  ======================================================================
"""

from __future__ import annotations

from collections.abc import Sequence


class BoincvmError(Exception):
    """Base of every error boincvm raises on purpose.

    Attributes:
        message: one sentence saying what went wrong.
        hint: what the user can do about it; the class's ``default_hint`` when the raiser
            gave none, so every refusal the CLI shows has a hint line.
        exit_code: the process exit code the CLI uses for this error.
    """

    exit_code: int = 1
    default_hint: str = "run again with --debug and report the output"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint

    def __str__(self) -> str:
        return self.message


class InputError(BoincvmError):
    """Input given by the user is wrong: a file, an option value, a batch row."""

    exit_code = 3
    default_hint = "check the file or option named above"


class XmlError(InputError):
    """An XML document is malformed, unsafe (DTD, entities) or of the wrong kind."""

    default_hint = "fix the XML file named above; 'boincvm validate FILE' lists every problem"


class PathEscapeError(InputError):
    """A path named by a job, a package or a guest would leave its directory."""

    default_hint = (
        "use a plain name or a relative path that stays inside its directory (no '..', no absolute path)"
    )


class ChecksumError(InputError):
    """A file's md5 or size does not match what its description says."""

    default_hint = "the file changed after it was described; make the artefact again"


class PackageError(InputError):
    """A guest package is unreadable, hostile or unfit for the image."""

    default_hint = (
        "rebuild the package with 'boincvm package-rpm'; 'boincvm validate PACKAGE' lists its problems"
    )


class ValidationFailed(BoincvmError):
    """``validate`` found at least one problem; ``findings`` lists them."""

    exit_code = 4
    default_hint = "fix the errors listed above"

    def __init__(self, message: str, findings: Sequence[object], *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.findings = list(findings)


class PathsNotJudged(ValidationFailed):
    """``validate`` could not read or place some of its paths (the others were judged)."""

    exit_code = 3
    default_hint = "check the paths named above"


class ToolError(BoincvmError):
    """An external program is missing, failed or timed out."""

    exit_code = 5
    default_hint = "check that the tool is installed and works (its last output is above)"


class CommandNotFound(ToolError):
    """An external program is not installed."""

    default_hint = "install the missing program (the README lists the Debian packages)"


class CommandFailed(ToolError):
    """An external program exited non-zero or timed out.

    Attributes:
        argv: the command that ran.
        returncode: its exit code (``None`` when it timed out).
        stderr_tail: the last lines of what it wrote to stderr.
    """

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stderr_tail: str,
        *,
        message: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        if message is None:
            what = "timed out" if returncode is None else f"exited with code {returncode}"
            last = stderr_tail.strip().splitlines()[-1:] if stderr_tail.strip() else []
            message = f"{argv[0]} {what}" + (f": {last[0]}" if last else "")
        super().__init__(message, hint=hint)


class HypervisorError(BoincvmError):
    """The hypervisor cannot run, or a VM operation failed."""

    exit_code = 6
    default_hint = "check the hypervisor's setup ('boincvm validate --boot IMAGE' probes it)"


class HypervisorUnavailable(HypervisorError):
    """The backend cannot run on this host (binary missing, no access, ...)."""


class UnsupportedOperation(HypervisorError):
    """The backend cannot do this operation at all."""


class VmTimeout(HypervisorError):
    """A bounded wait on the VM ran out."""


class GuestError(BoincvmError):
    """Something inside the guest went wrong."""

    exit_code = 7
    default_hint = "check the guest image and the job with 'boincvm validate'"


class GuestToolsMissing(GuestError):
    """The guest tools the backend needs are absent or never answered."""


class GuestProgramFailed(GuestError):
    """A program run in the guest exited non-zero."""


class OutputError(GuestError):
    """A result file is missing, too big or names a path outside the slot."""

    default_hint = (
        "make the program write its results where the job's output_file names say, within max_nbytes"
    )


class OutputMissing(OutputError):
    """A result file the program never wrote (the wrapper skips an optional one)."""


class FaultsMissed(BoincvmError):
    """``run-local`` ran the workunit, but a fault it was asked to inject never happened."""

    exit_code = 10
    default_hint = "pick a point the run reaches (see the summary's faults_missed)"


class WorkunitFailed(BoincvmError):
    """A workunit run by ``run-local`` ended in a BOINC error outcome."""

    exit_code = 8
    default_hint = "see the summary and stderr.txt in the results directory"
