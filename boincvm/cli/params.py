"""Option values shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

BACKEND_OPTION_HELP = (
    "A backend option NAME=VALUE (repeatable), e.g. machine=pc for QEMU or guest_user=boinc for "
    "VMware; docs/vm-job.md lists them."
)


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
