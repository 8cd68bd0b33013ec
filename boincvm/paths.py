"""Checks on the directories boincvm creates, before anything is created or deleted.

An output directory replaced with ``--force`` is deleted; so it must not be, contain or
lie inside one of the command's inputs, nor be the working directory or above it. And
where it cannot be made (a parent is a file, or not writable) that is said in one
sentence before any work starts. Ground module: imports only :mod:`boincvm.errors`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from boincvm.errors import InputError

_OTHER_OUTPUT = "choose another output directory (-o) that holds none of the inputs"


def _real(path: Path) -> Path:
    # resolve() follows symlinks, so a link to an input is seen as that input.
    return Path(os.path.realpath(path))


def refuse_output_overlapping(output: Path, inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse an output directory that is, contains, or lies inside an input.

    Args:
        output: the directory the command will create (or replace).
        inputs: ``(what, path)`` for every file or directory the command reads.

    Raises:
        InputError: naming the input the output would overlap.
    """
    out = _real(output)
    for what, path in inputs:
        src = _real(path)
        if out == src:
            raise InputError(f"output directory {output} is {what} {path}", hint=_OTHER_OUTPUT)
        if src.is_relative_to(out):
            raise InputError(
                f"output directory {output} holds {what} {path}; replacing it would delete that input",
                hint=_OTHER_OUTPUT,
            )
        if out.is_relative_to(src):
            raise InputError(f"output directory {output} lies inside {what} {path}", hint=_OTHER_OUTPUT)


def inside(path: str | Path, directory: Path) -> bool:
    """True when ``path`` (symlinks resolved) is ``directory`` or below it."""
    return _real(Path(path)).is_relative_to(_real(directory))


def check_output_dir(output: Path) -> None:
    """Refuse an output directory that cannot be made, or whose replacement would be destructive.

    Raises:
        InputError: it is the working directory or above it, an existing parent is not a
            directory, the nearest existing parent is not writable, or it exists as a file.
    """
    out = _real(output)
    cwd = _real(Path.cwd())
    if cwd.is_relative_to(out):
        raise InputError(
            f"output directory {output} is the working directory or one of its parents",
            hint="give a new directory, e.g. -o out; boincvm replaces the whole output directory",
        )
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise InputError(
            f"output directory {output} exists and is not a directory"
            + (" (it is a symlink)" if output.is_symlink() else ""),
            hint="remove it or choose another output directory",
        )
    parent = output.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(
            f"cannot create output directory {output}: {parent} is not a directory",
            hint="choose an output directory whose parents are directories",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(
            f"cannot create output directory {output}: {parent} is not writable",
            hint="choose a directory you may write to, or fix its permissions",
        )


def refuse_symlinks_in(directory: Path, what: str) -> None:
    """Refuse a directory boincvm will write files into when it, or an entry in it, is a symlink.

    A file written there through a symlink (even a dangling one) lands wherever the link
    points, outside the directory; the check runs before anything is written.

    Raises:
        InputError: naming the symlink.
    """
    hint = f"remove the symlink or choose another {what}"
    if directory.is_symlink():
        raise InputError(f"{what} {directory} is a symlink (to {directory.readlink()})", hint=hint)
    if not directory.is_dir():
        if directory.exists():
            raise InputError(f"{what} {directory} exists and is not a directory", hint=hint)
        return
    for entry in directory.iterdir():
        if entry.is_symlink():
            raise InputError(
                f"{what} {directory} holds a symlink {entry.name} (to {entry.readlink()}); "
                "boincvm would write through it",
                hint=hint,
            )
