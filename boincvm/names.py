"""Checks for the names and paths that jobs, workunits and guests use.

Logical (open) names live in a BOINC slot directory: a single path component. Guest
names are relative paths below the job's working directory in the guest. Neither may
escape its directory. Identifiers that become directory or file names on a project
server (app names, platforms, plan classes, app-version physical names) are single
components of a small alphabet (:func:`identifier_problem`). This is the one boundary
for untrusted names; :mod:`boincvm.bounds` is its sibling for numbers and files.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from boincvm.errors import InputError, PathEscapeError

_WU_NAME_BAD = re.compile(r"[^A-Za-z0-9_.\-]")
#: C0 controls, DEL and C1 controls: never part of a name (terminal escapes start with them).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: What BOINC's names on the server side use: app names, platforms, plan classes.
_IDENTIFIER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]*")


def logical_name_problem(name: str) -> str | None:
    """Why ``name`` is not a usable BOINC logical file name, or None if it is."""
    if not name:
        return "must not be empty"
    if name in (".", ".."):
        return f"{name!r} is not a file name"
    if "/" in name or "\\" in name:
        return f"{name!r} must be a plain file name, not a path"
    if _CONTROL.search(name) or name != name.strip():
        return f"{name!r} contains control characters or surrounding spaces"
    if len(name.encode()) > 255:
        return "is longer than 255 bytes"
    return None


def _empty_or_control(text: str) -> str | None:
    """What no path or identifier may be: empty, or holding control characters."""
    if not text:
        return "must not be empty"
    if _CONTROL.search(text):
        return "contains control characters"
    return None


def guest_path_problem(path: str) -> str | None:
    """Why ``path`` is not usable as a guest path (absolute or relative), or None."""
    return _empty_or_control(path)


def relative_path_problem(path: str) -> str | None:
    """Why ``path`` is not a safe relative path (no absolute, no ``..``), or None."""
    if problem := _empty_or_control(path):
        return problem
    if path.startswith("/") or path.startswith("\\") or re.match(r"^[A-Za-z]:", path):
        return f"{path!r} is absolute; give a path relative to the job's directory"
    parts = PurePosixPath(path.replace("\\", "/")).parts
    if ".." in parts:
        return f"{path!r} leaves its directory (contains '..')"
    return None


def identifier_problem(name: str) -> str | None:
    """Why ``name`` is not a server-side identifier (app name, platform, plan class), or None.

    One path component of letters, digits and ``_ . + -``, not starting with ``.`` or
    ``-`` (so never ``..``, never an option), at most 128 bytes.
    """
    if problem := _empty_or_control(name):
        return problem
    if not _IDENTIFIER.fullmatch(name):
        return f"{name!r} may hold only letters, digits, '_', '.', '+', '-' (a letter or digit first)"
    if len(name) > 128:
        return "is longer than 128 characters"
    return None


def check_identifier(name: str, what: str) -> str:
    """``name`` when it is a server-side identifier (see :func:`identifier_problem`).

    Raises:
        InputError: naming ``what`` and the problem.
    """
    if problem := identifier_problem(name):
        raise InputError(
            f"{what} {problem}" if problem.startswith(repr(name)) else f"{what} {name!r} {problem}",
            hint="use letters, digits, '_', '.', '+' and '-' only, e.g. x86_64-pc-linux-gnu",
        )
    return name


def check_logical_name(name: str, what: str) -> str:
    """``name`` when it is a usable logical (slot) file name.

    Raises:
        PathEscapeError: it is ``..``, a path, or holds control characters.
    """
    if problem := logical_name_problem(name):
        raise PathEscapeError(
            f"{what}: {problem}", hint="give a plain file name: no '/', no '..', no control characters"
        )
    return name


def check_relative_path(path: str, what: str) -> str:
    """``path`` when it is a relative path that stays inside its directory.

    Raises:
        PathEscapeError: absolute, ``..``, or control characters.
    """
    if problem := relative_path_problem(path):
        raise PathEscapeError(
            f"{what}: {problem}", hint="give a path relative to the job's directory, without '..'"
        )
    return path


def sanitize_wu_name(name: str) -> str:
    """Make a workunit name BOINC accepts: letters, digits, ``_ . -`` only."""
    return _WU_NAME_BAD.sub("_", name)[:200] or "wu"
