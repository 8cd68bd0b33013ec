"""Options, arguments and path types shared by several commands, defined once so that the
same option reads the same (name, parameter, type) in every command that takes it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

#: A file that must exist (the command reads it).
EXISTING_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)
#: A directory that must exist (the command reads it).
EXISTING_DIR = click.Path(path_type=Path, file_okay=False, exists=True)
#: A file or directory that must exist.
EXISTING = click.Path(path_type=Path, exists=True)
#: A file that may not exist yet (the command says what is wrong with a missing one itself).
FILE = click.Path(path_type=Path, dir_okay=False)
#: A directory the command creates or writes into.
DIRECTORY = click.Path(path_type=Path, file_okay=False)
#: Any path; the core judges what it is.
ANY_PATH = click.Path(path_type=Path)

BACKEND_OPTION_HELP = (
    "A backend option NAME=VALUE (repeatable), e.g. machine=pc for QEMU or guest_user=boinc for "
    "VMware; docs/vm-job.md lists them."
)

#: ``--app``: every artefact belongs to one BOINC application.
app_option = click.option("--app", "app_name", required=True, help="BOINC application name.")
#: ``--force`` of the commands that build an output directory whole (``boincvm.atomicdir``).
force_option = click.option("--force", is_flag=True, help="Replace the output directory if it exists.")


def json_option(help_text: str) -> Callable[[F], F]:
    """The ``--json`` flag (parameter ``as_json``): the result as JSON on stdout, ``help_text``
    saying which result."""
    return click.option("--json", "as_json", is_flag=True, help=help_text)


def name_values(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    """Split each ``NAME=VALUE`` (a click callback).

    Raises:
        click.BadParameter: an item has no ``=`` or no name.
    """
    out: list[tuple[str, str]] = []
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r} is not NAME=VALUE")
        out.append((name.strip(), value))
    return tuple(out)


def backend_option(extra_help: str = "") -> Callable[[F], F]:
    """The repeatable ``--backend-option NAME=VALUE`` option (parameter ``backend_options``)."""
    return click.option(
        "--backend-option",
        "backend_options",
        multiple=True,
        metavar="NAME=VALUE",
        callback=name_values,
        help=f"{BACKEND_OPTION_HELP} {extra_help}".strip(),
    )
