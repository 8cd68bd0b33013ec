"""Human output: rich on stderr, plain lines off a terminal; artefacts go to stdout elsewhere."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

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


def _make() -> Console:
    # markup and highlighting off: XML and paths must never be read as rich markup.
    return Console(
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


def out(text: str) -> None:
    """An artefact on stdout (XML, JSON, paths)."""
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
