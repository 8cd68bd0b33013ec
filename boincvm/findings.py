"""Findings: what ``validate`` reports, each naming its place."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import asdict, dataclass


class Severity(enum.StrEnum):
    """How bad a finding is; only errors make a verdict fail."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    """One thing ``validate`` found.

    Attributes:
        place: where, as a dotted path or file name (``vm_job.task.command_line``).
        message: what is wrong, one sentence without a trailing full stop.
        severity: error, warning or info.
        hint: how to fix it, or None.
    """

    place: str
    message: str
    severity: Severity = Severity.ERROR
    hint: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        """A JSON-ready dictionary."""
        d = asdict(self)
        d["severity"] = self.severity.value
        return d

    @property
    def is_error(self) -> bool:
        """True for an error (not a warning or a note)."""
        return self.severity is Severity.ERROR

    def __str__(self) -> str:
        return f"{self.place}: {self.message}"


def error(place: str, message: str, hint: str | None = None) -> Finding:
    """An error finding."""
    return Finding(place, message, Severity.ERROR, hint)


def warning(place: str, message: str, hint: str | None = None) -> Finding:
    """A warning finding."""
    return Finding(place, message, Severity.WARNING, hint)


def info(place: str, message: str) -> Finding:
    """An informational finding."""
    return Finding(place, message, Severity.INFO)


def has_errors(findings: Iterable[Finding]) -> bool:
    """True when any finding is an error."""
    return any(f.severity is Severity.ERROR for f in findings)


def errors_in(findings: Iterable[Finding]) -> list[Finding]:
    """The findings that are errors, in order."""
    return [f for f in findings if f.severity is Severity.ERROR]
