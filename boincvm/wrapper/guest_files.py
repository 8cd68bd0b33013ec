"""The wrapper's reads of the guest program's files, through the guest agent.

:mod:`.guest_contract` says what the files mean and how to read them as untrusted input;
this module fetches them: what each path is (before anything opens one), one guest
command that surveys the contract files due at a poll, their contents, and the notes
logged once when a value was clamped or ignored.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import TypeVar

from boincvm.errors import GuestError, GuestProgramFailed
from boincvm.hypervisor.base import Backend, ProcessStatus
from boincvm.job import ResolvedJob
from boincvm.wrapper.guest_contract import (
    GuestFileKind,
    Survey,
    kind_problem,
    kinds_argv,
    parse_kinds,
    parse_survey,
    survey_argv,
)

log = logging.getLogger(__name__)

_Answer = TypeVar("_Answer")

#: Contract files up to this size come with the guest command that surveys them; larger
#: ones (long trigger messages) are read through the agent.
SURVEY_READ_BYTES = 4096
#: The survey lists at most this many names of a listed directory (the trickle-up one).
SURVEY_LIST_NAMES = 256
#: Seconds the guest's shell may take to say what the guest files are.
KIND_TIMEOUT = 60.0
#: At most this much of a trigger file is read (its first lines count).
TRIGGER_MAX_BYTES = 65536


class GuestFiles:
    """The job's files in the guest, read defensively through one backend."""

    def __init__(self, vm: Backend, job: ResolvedJob) -> None:
        self.vm = vm
        self.job = job
        self._notes: dict[str, str] = {}  # the last note logged about each guest file

    def path(self, name: str) -> str:
        """The guest path of a job file (relative names are under the job's directory)."""
        return self.job.guest_path(name)

    def sh(self, script: str, *, timeout: float = 60.0, what: str) -> ProcessStatus:
        """Run ``/bin/sh -c script`` in the guest.

        Raises:
            GuestProgramFailed: it exited with a failure.
        """
        status = self.vm.run_program(["/bin/sh", "-c", script], timeout=timeout)
        if not status.succeeded:
            err = (status.stderr_tail or status.stdout_tail).decode("utf-8", "replace").strip()
            raise GuestProgramFailed(f"{what} failed in the guest (exit {status.exit_code}): {err[-300:]}")
        return status

    def note(self, key: str, note: str | None) -> None:
        """Log why a guest file's value was clamped or ignored, once until the reason changes."""
        if note is not None and self._notes.get(key) != note:
            log.warning("%s", note)
        if note is not None:
            self._notes[key] = note

    def kinds(self, paths: list[str]) -> dict[str, GuestFileKind]:
        """What each guest path is, from the guest's shell, before anything opens one.

        Raises:
            GuestError: the guest's shell did not answer as the script prints.
        """
        if not paths:
            return {}
        return self._ask_shell(kinds_argv(self.job.exec_dir, paths), lambda out: parse_kinds(out, paths))

    def _ask_shell(self, argv: list[str], parse: Callable[[bytes], _Answer | None]) -> _Answer:
        """Run one of the guest_contract scripts and parse what it printed.

        Raises:
            GuestError: it failed, or its output does not fit.
        """
        status = self.vm.run_program(argv, timeout=KIND_TIMEOUT)
        answer = parse(status.stdout_tail) if status.succeeded else None
        if answer is None:
            err = (status.stderr_tail or status.stdout_tail).decode("utf-8", "replace").strip()
            raise GuestError(
                f"the guest's shell could not say what the job's files are (exit {status.exit_code}): "
                f"{err[-300:]}"
            )
        return answer

    def survey(self, entries: dict[str, int]) -> Survey:
        """The files ``entries`` names (job file -> bytes to read, or names to list), surveyed in
        one guest command: each one's kind and, for the small regular ones, their contents.

        Raises:
            GuestError: the guest's shell did not answer as the script prints.
        """
        wanted = {self.path(name): size for name, size in entries.items()}
        paths = sorted(wanted)
        if not paths:
            return Survey({}, {})
        token = "boincvm-" + secrets.token_hex(8)
        argv = survey_argv(self.job.exec_dir, token, [(p, wanted[p]) for p in paths])
        return self._ask_shell(argv, lambda out: parse_survey(out, token, paths))

    def read(self, name: str | None, what: str, survey: Survey, max_bytes: int) -> bytes | None:
        """A contract file's first ``max_bytes``, or None when it is absent or not a regular file."""
        if not name:
            return None
        path = self.path(name)
        kind = survey.kind(path)
        if problem := kind_problem(kind):
            self.note(what, f"the {what} file {path} {problem}; ignored")
            return None
        if kind is not GuestFileKind.FILE:
            return None
        data = survey.data.get(path)
        if data is not None and len(data) <= SURVEY_READ_BYTES:
            return data[:max_bytes]
        return self.vm.read_guest_file(path, max_bytes=max_bytes)  # larger, or no ``head`` in the guest


__all__ = ["KIND_TIMEOUT", "SURVEY_LIST_NAMES", "SURVEY_READ_BYTES", "TRIGGER_MAX_BYTES", "GuestFiles"]
