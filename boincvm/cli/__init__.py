"""The boincvm command line: thin click commands over the domain core.

This is the only package that imports click, and the one place that maps errors to
exit codes (see :mod:`boincvm.errors`).
"""

from __future__ import annotations

import io
import json
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

import click

from boincvm import __version__
from boincvm.cli import console
from boincvm.errors import BoincvmError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when used, so ``--help`` is instant."""

    COMMANDS: dict[str, tuple[str, str]] = {
        "make-workunit": (
            "boincvm.cli.make_workunit",
            "Make BOINC workunits from a program package and inputs.",
        ),
        "validate": ("boincvm.cli.validate", "Check a vm job, workunit, app version, package or image."),
        "package-image": ("boincvm.cli.package_image", "Turn a base VM image into a BOINC app version."),
        "build-image": (
            "boincvm.cli.build_image",
            "Build a guest image: the example from Debian packages, or from a container image (--from-oci).",
        ),
        "package-rpm": (
            "boincvm.cli.package_rpm",
            "Build a guest RPM (or tarball) from a program directory.",
        ),
        "deploy": (
            "boincvm.cli.deploy",
            "Install app versions and submit workunits into a BOINC project (its own tools).",
        ),
        "run-local": ("boincvm.cli.run_local", "Run a workunit end to end here, emulating the BOINC client."),
        "wrapper": ("boincvm.cli.wrapper", "The wrapper the BOINC client runs in a slot (not for humans)."),
        "keys": ("boincvm.cli.keys", "Create and use a project code-signing key pair."),
        "guest-api": (
            "boincvm.cli.guest_api",
            "Write the BOINC API for programs inside the VM (C, Python, shell).",
        ),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:  # noqa: ARG002 - click API
        import importlib.util

        return [n for n, (mod, _) in self.COMMANDS.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:  # noqa: ARG002
        import importlib

        entry = self.COMMANDS.get(cmd_name)
        if entry is None:
            return None
        try:
            module = importlib.import_module(entry[0])
        except ModuleNotFoundError as exc:
            if exc.name == entry[0]:
                return None
            raise
        command: click.Command = module.command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, self.COMMANDS[n][1]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="boincvm")
@click.option("-v", "--verbose", count=True, help="More output (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """boincvm: run ordinary programs in virtual machines on BOINC volunteers' computers."""
    ctx.obj = {"debug": debug}
    console.set_verbosity(-1 if quiet else verbose)
    level = logging.DEBUG if debug or verbose >= 2 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_PrintableFormatter(handler.formatter))


class _PrintableFormatter(logging.Formatter):
    """Log lines reach the terminal too: control characters in them are escaped like the rest."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return console.printable(self.inner.format(record))


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so every ``finally`` cleanup runs.

    A BaseException (not an Exception) so that no ``except Exception`` on the way swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: The signals that end a command; SIGINT already raises KeyboardInterrupt.
_ENDING = (signal.SIGTERM, signal.SIGHUP)


def _terminate(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001 - signal handler API
    # The cleanup that follows (removing a half-built directory) must not be cut short by a
    # second signal: from now on they are ignored, Ctrl-C included.
    for sig in (*_ENDING, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


@contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` for the command's duration, then restore."""
    try:
        saved = {sig: signal.signal(sig, _terminate) for sig in _ENDING}
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def _os_error_sentence(exc: OSError) -> str:
    where = " and ".join(repr(str(f)) for f in (exc.filename, exc.filename2) if f is not None)
    what = exc.strerror or str(exc)
    return f"{where}: {what.lower()}" if where else f"operating-system error: {what.lower()}"


def _show_click_error(exc: click.ClickException) -> None:
    buffer = io.StringIO()
    exc.show(file=buffer)
    sys.stderr.write(console.printable(buffer.getvalue()))
    sys.stderr.flush()


def _json_failure(code: int, sentence: str, hint: str | None, *, as_json: bool) -> None:
    """With ``--json``, the failure as one JSON object on stdout, unless the command wrote its own."""
    if as_json and not console.wrote_stdout():
        doc = {"ok": False, "exit_code": code, "error": sentence} | ({"hint": hint} if hint else {})
        console.out(json.dumps(doc, indent=2))


def _fail(code: int, sentence: str, hint: str, *, as_json: bool) -> NoReturn:
    """Say what went wrong on stderr (and, with ``--json``, on stdout), then exit."""
    console.error(sentence, hint)
    _json_failure(code, sentence, hint, as_json=as_json)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``boincvm`` console script; maps errors to documented exit codes.

    With ``--json``, a failure also prints one JSON object on stdout (``ok`` false, the exit
    code, the sentence and the hint), so a script always has JSON to read, unless the command
    printed its own JSON before failing (``validate``'s findings, ``run-local``'s summary).
    """
    from boincvm.bounds import os_hint

    args = argv if argv is not None else sys.argv[1:]
    debug = "--debug" in args
    as_json = "--json" in args
    console.forget_stdout()
    try:
        with _signals_as_exceptions():
            cli.main(args=argv, prog_name="boincvm", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        _fail(130, "interrupted", "nothing half-made was left behind; run the command again", as_json=as_json)
    except click.ClickException as exc:
        _show_click_error(exc)
        _json_failure(exc.exit_code, exc.format_message(), None, as_json=as_json)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _fail(130, "interrupted", "nothing half-made was left behind; run the command again", as_json=as_json)
    except Terminated as exc:
        name = signal.Signals(exc.signum).name
        again = "nothing half-made was left behind; run the command again"
        _fail(128 + exc.signum, f"terminated by {name}", again, as_json=as_json)
    except BoincvmError as exc:
        if debug:
            console.err.print_exception(show_locals=False)
        # A command that printed its own JSON (validate's findings, run-local's summary) keeps
        # stdout to that one document.
        _fail(exc.exit_code, exc.message, exc.hint, as_json=as_json)
    except OSError as exc:
        # An OS error on a path the user named (ENOTDIR, EACCES, ENOSPC, EROFS, ...) is a
        # sentence about that path, not a bug; the domain names most of them itself.
        if debug:
            console.err.print_exception(show_locals=False)
        _fail(3, _os_error_sentence(exc), os_hint(exc), as_json=as_json)
    except Exception:
        if debug:
            raise
        console.err.print_exception(show_locals=False, max_frames=4)
        bug = "run again with --debug and report the output"
        _fail(1, "internal error; this is a bug in boincvm", bug, as_json=as_json)
    sys.exit(0)
