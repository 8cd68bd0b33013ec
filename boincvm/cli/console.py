"""Human output: rich on stderr, plain lines off a terminal; artefacts go to stdout elsewhere."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_verbosity = 0


def set_verbosity(level: int) -> None:
    """-1 quiet, 0 normal, 1+ verbose."""
    global _verbosity
    _verbosity = level


def verbosity() -> int:
    """The verbosity set by -v/-q."""
    return _verbosity


#: C0 controls but tab and newline, DEL and C1 controls: what a hostile file name would use to
#: move the cursor, recolour or retitle the terminal (``\x1b[31m``, ``\x9b``, ``\r``).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``), never sent raw."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1] if m.group() != "\x1b" else "\\x1b", text)


class _SafeConsole(Console):
    """A rich console that escapes control characters in every string it is given.

    Every human line boincvm prints goes through here (file names, XML values and guest
    output included), so this is the one place terminal escapes are neutralised.
    """

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(printable(o) if isinstance(o, str) else o for o in objects), **kwargs)


def _make() -> Console:
    # markup and highlighting off: XML and paths must never be read as rich markup.
    return _SafeConsole(
        stderr=True,
        markup=False,
        highlight=False,
        no_color="NO_COLOR" in os.environ,
        soft_wrap=True,
    )


err = _make()


def interactive() -> bool:
    """True when stderr is a terminal and we are not in CI (progress bars may redraw)."""
    return err.is_terminal and not os.environ.get("CI")


def info(msg: str) -> None:
    """A normal progress line."""
    if _verbosity >= 0:
        err.print(msg)


def note(msg: str) -> None:
    """A visible note (e.g. a fallback taken)."""
    if _verbosity >= 0:
        err.print(f"note: {msg}", style="yellow")


def success(msg: str) -> None:
    """A final success line."""
    if _verbosity >= 0:
        err.print(msg, style="green")


def error(msg: str, hint: str | None = None) -> None:
    """An error sentence and its hint."""
    err.print(f"error: {msg}", style="bold red")
    if hint:
        err.print(f"hint: {hint}", style="cyan")


#: Whether this command has written an artefact on stdout (a --json failure then adds no second document).
_wrote = [False]


def forget_stdout() -> None:
    """A new command starts (the tests run several in one process): nothing written yet."""
    _wrote[0] = False


def wrote_stdout() -> bool:
    """Whether :func:`out` has written anything since the process started."""
    return _wrote[0]


def out(text: str) -> None:
    """An artefact on stdout (XML, JSON, paths)."""
    _wrote[0] = True
    # Artefacts are written as they are, except to a terminal, which gets escapes shown.
    if sys.stdout.isatty():
        text = printable(text)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


@contextmanager
def progress_bar(description: str) -> Iterator[Progress]:
    """A progress bar on a terminal; off a terminal a start and an end line only."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not interactive() or _verbosity < 0,
        transient=False,
    )
    if not interactive():
        info(f"{description} ...")
    with bar:
        yield bar
