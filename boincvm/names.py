"""Checks for the names and paths that jobs, workunits and guests use.

Logical (open) names live in a BOINC slot directory: a single path component. Guest
names are relative paths below the job's working directory in the guest. Neither may
escape its directory.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

_WU_NAME_BAD = re.compile(r"[^A-Za-z0-9_.\-]")


def logical_name_problem(name: str) -> str | None:
    """Why ``name`` is not a usable BOINC logical file name, or None if it is."""
    if not name:
        return "must not be empty"
    if name in (".", ".."):
        return f"{name!r} is not a file name"
    if "/" in name or "\\" in name:
        return f"{name!r} must be a plain file name, not a path"
    if any(c in name for c in "\0\n\r\t") or name != name.strip():
        return f"{name!r} contains control characters or surrounding spaces"
    if len(name.encode()) > 255:
        return "is longer than 255 bytes"
    return None


def relative_path_problem(path: str) -> str | None:
    """Why ``path`` is not a safe relative path (no absolute, no ``..``), or None."""
    if not path:
        return "must not be empty"
    if any(c in path for c in "\0\n\r"):
        return "contains control characters"
    if path.startswith("/") or path.startswith("\\") or re.match(r"^[A-Za-z]:", path):
        return f"{path!r} is absolute; give a path relative to the job's directory"
    parts = PurePosixPath(path.replace("\\", "/")).parts
    if ".." in parts:
        return f"{path!r} leaves its directory (contains '..')"
    return None


def guest_path_problem(path: str) -> str | None:
    """Why ``path`` is not usable as a guest path (absolute or relative), or None."""
    if not path:
        return "must not be empty"
    if any(c in path for c in "\0\n\r"):
        return "contains control characters"
    return None


def sanitize_wu_name(name: str) -> str:
    """Make a workunit name BOINC accepts: letters, digits, ``_ . -`` only."""
    return _WU_NAME_BAD.sub("_", name)[:200] or "wu"
