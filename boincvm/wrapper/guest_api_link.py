"""The wrapper's end of the guest BOINC API (issue #15): its directory in the guest, the
program's status, the checkpoint handshake, its finish and temporary-exit files, trickles.

:mod:`.guest_api` says what the files are and reads them as untrusted input (pure, no
I/O); :class:`GuestApiLink` makes the directory, surveys and writes the files through
:class:`~.guest_files.GuestFiles`, and passes trickles between the guest and the client.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from boincvm.boinc.api import BoincApp
from boincvm.boinc.files import TRICKLE_UP_FILE
from boincvm.job import CheckpointMode
from boincvm.wrapper import guest_api
from boincvm.wrapper.guest_contract import GuestFileKind, Survey, Trigger, temporary_exit_trigger
from boincvm.wrapper.guest_files import (
    KIND_TIMEOUT,
    SURVEY_LIST_NAMES,
    SURVEY_READ_BYTES,
    TRIGGER_MAX_BYTES,
    GuestFiles,
)

log = logging.getLogger(__name__)

#: A program that asks whether to checkpoint gets at least this long to say it is ready.
CHECKPOINT_READY_WAIT = 60.0


class GuestApiLink:
    """The guest API's files of one task, and the state of its checkpoint handshake."""

    def __init__(self, files: GuestFiles, app: BoincApp) -> None:
        self.files = files
        self.app = app
        self.dir = files.path(guest_api.API_DIR)
        self.uses_checkpoints = False  # the program has asked boinc_time_to_checkpoint()
        self._request: int | None = None  # the pending checkpoint request
        self._requested_at = 0.0
        self._sequence = 0
        self._network_suspended = False  # what the guest was last told

    def file(self, name: str) -> str:
        """The guest path of one of the API's files."""
        return f"{self.dir}/{name}"

    def environment(self) -> dict[str, str]:
        """What the program's environment needs to find the API's directory."""
        return {guest_api.API_DIR_ENV: self.dir}

    def dir_script(self) -> str:
        """The guest shell command that makes the guest API's directory (mode 0700) with its
        ``resolve`` file, before the program starts (part of the install's first command)."""
        job, path = self.files.job, self.files.path
        names = [(i.open_name, path(i.guest_path)) for i in job.input_files]
        names += [(o.open_name, path(o.guest_path)) for o in job.output_files]
        text = guest_api.resolve_text(names)
        api = shlex.quote(self.dir)
        resolve = shlex.quote(self.file(guest_api.RESOLVE))
        up, down = (shlex.quote(self.file(d)) for d in (guest_api.TRICKLE_UP_DIR, guest_api.TRICKLE_DOWN_DIR))
        # One fork (mkdir) on a fresh guest: rm only when something is in the way, and the
        # resolve file written in place (the program has not started yet).
        return (
            f"{{ {{ [ ! -e {api} ] && [ ! -L {api} ]; }} || rm -rf {api}; }} && "
            f"mkdir -p -m 0700 {api} {up} {down} && printf %s {shlex.quote(text)} > {resolve}"
        )

    def survey_entries(self) -> dict[str, int]:
        """The API's files every survey looks at (see :meth:`GuestFiles.survey`)."""
        read = (guest_api.STATUS, guest_api.CHECKPOINT_READY, guest_api.FINISH, guest_api.TEMPORARY_EXIT)
        entries = {self.file(n): SURVEY_READ_BYTES + 1 for n in read}
        entries[self.file(guest_api.CRITICAL)] = 0
        entries[self.file(guest_api.TRICKLE_UP_DIR)] = SURVEY_LIST_NAMES
        return entries

    def read_status(self, survey: Survey, ops_limit: float | None) -> guest_api.ApiStatus | None:
        """The program's ``status`` file, or None when it has written none."""
        data = self.files.read(
            self.file(guest_api.STATUS), "guest API status", survey, guest_api.STATUS_MAX_BYTES
        )
        if data is None:
            return None
        status = guest_api.parse_status(data, ops_limit)
        self.files.note("status fraction", status.fraction.note)
        self.files.note("status operations", status.ops.note)
        self.uses_checkpoints = self.uses_checkpoints or status.uses_checkpoints
        return status

    def in_critical_section(self) -> bool:
        """Whether the program is inside a critical section now (``critical`` exists)."""
        path = self.file(guest_api.CRITICAL)
        return self.files.kinds([path]).get(path, GuestFileKind.MISSING) is not GuestFileKind.MISSING

    # -- the checkpoint handshake ---------------------------------------------
    @property
    def checkpoint_requested(self) -> bool:
        """A checkpoint was asked for and not taken yet."""
        return self._request is not None

    def ready_to_checkpoint(self, survey: Survey, now: float) -> bool:
        """Whether to checkpoint now, in a checkpoint timed by the program: ask first
        (``checkpoint_request``), then yes once it says it is ready, or at once when it never
        asks whether to checkpoint, or when it has not answered in time; never while it is in
        a critical section. :meth:`checkpoint_taken` ends the request."""
        ready: int | None = None
        if self._request is None:
            self._sequence += 1
            self._request = self._sequence
            self._requested_at = now
            self._write(guest_api.CHECKPOINT_REQUEST, f"{self._request}\n")
            if self.uses_checkpoints:
                return False  # the program answers at its next boinc_time_to_checkpoint()
        else:
            path = self.file(guest_api.CHECKPOINT_READY)
            ready = guest_api.sequence_of(self.files.read(path, "checkpoint ready", survey, 64))
        if survey.kind(self.file(guest_api.CRITICAL)) is not GuestFileKind.MISSING:
            return False  # inside a critical section: try at the next poll
        if self.files.job.checkpoint_mode is CheckpointMode.APP and ready != self._request:
            return False  # the program's files are consistent only at its checkpoint_ready
        wait = max(CHECKPOINT_READY_WAIT, self.app.init_data.effective_checkpoint_period)
        if ready != self._request and self.uses_checkpoints and now - self._requested_at < wait:
            return False
        if ready != self._request:
            if self.uses_checkpoints:
                log.info(
                    "the program did not say it is ready to checkpoint within %g s; snapshotting now", wait
                )
            if self.in_critical_section():
                return False
        if ready == self._request:
            log.info("checkpoint %d at the program's checkpoint_ready", ready)
        return True

    def checkpoint_taken(self) -> None:
        """End the pending request: the checkpoint is committed."""
        self._request = None
        self.end_checkpoint_request()

    def end_checkpoint_request(self) -> None:
        """Remove ``checkpoint_request``: a program blocked in boinc_checkpoint_completed() goes on."""
        self.files.sh(
            f"rm -f {shlex.quote(self.file(guest_api.CHECKPOINT_REQUEST))}",
            what="ending the checkpoint request",
        )

    def tell_network_suspended(self, suspended: bool) -> None:
        """Make ``network_suspended`` say what the client says (written only when it changes)."""
        if suspended == self._network_suspended:
            return
        if suspended:
            self._write(guest_api.NETWORK_SUSPENDED, "1\n")
        else:
            path = shlex.quote(self.file(guest_api.NETWORK_SUSPENDED))
            self.files.sh(f"rm -f {path}", what="ending the network suspension")
        self._network_suspended = suspended

    def _write(self, name: str, text: str) -> None:
        path = shlex.quote(self.file(name))
        self.files.sh(
            f"printf %s {shlex.quote(text)} > {path}.tmp && mv {path}.tmp {path}", what=f"writing {name}"
        )

    # -- the end the program asks for -----------------------------------------
    def end_trigger(self, survey: Survey) -> Trigger | None:
        """The program's ``finish`` or ``temporary_exit`` file, read and parsed, or None."""
        read = self.files.read
        data = read(self.file(guest_api.FINISH), "finish", survey, TRIGGER_MAX_BYTES)
        if data is not None:
            trigger = guest_api.parse_finish(data)
        else:
            data = read(self.file(guest_api.TEMPORARY_EXIT), "temporary exit", survey, TRIGGER_MAX_BYTES)
            if data is None:
                return None
            trigger = temporary_exit_trigger(data, "temporary exit file:")
        self.files.note(trigger.kind, trigger.note)
        return trigger

    # -- trickles ---------------------------------------------------------------
    def pass_trickles(self, survey: Survey) -> None:
        """Trickle-up messages from the guest to the client (one at a time, as BOINC's API
        keeps one ``trickle_up.xml``), and the client's trickle-down files into the guest."""
        slot = self.app.slot_dir
        self._pass_trickles_down(slot)
        updir = self.file(guest_api.TRICKLE_UP_DIR)
        if survey.kind(updir) is not GuestFileKind.DIRECTORY or (slot / TRICKLE_UP_FILE).exists():
            return
        listing = survey.data.get(updir)
        if listing is None:  # the survey lists it; ``ls`` only if that did not work
            listing = self.files.vm.run_program(["/bin/ls", "-1", updir], timeout=KIND_TIMEOUT).stdout_tail
        names = guest_api.trickle_names(listing)[:1]
        for path, kind in self.files.kinds([f"{updir}/{n}" for n in names]).items():
            self._pass_trickle_up(path, kind)

    def _pass_trickles_down(self, slot: Path) -> None:
        for down in sorted(slot.glob("trickle_down*")):
            if down.is_file():
                self.files.vm.copy_to_guest(down, f"{self.file(guest_api.TRICKLE_DOWN_DIR)}/{down.name}")
                down.unlink()
                log.info("trickle-down %s passed to the guest", down.name)

    def _pass_trickle_up(self, path: str, kind: GuestFileKind) -> None:
        data = (
            self.files.vm.read_guest_file(path, max_bytes=guest_api.TRICKLE_MAX_BYTES)
            if kind is GuestFileKind.FILE
            else None
        )
        self.files.sh(f"rm -f {shlex.quote(path)}", what="taking a trickle-up message")
        got = guest_api.parse_trickle(data) if data is not None else None
        if got is None:
            self.files.note(
                "trickle", f"trickle-up message {path} is not a regular file with a variety; dropped"
            )
            return
        self.app.send_trickle_up(*got)
        log.info("trickle-up %s (variety %s, %d bytes) sent", path.rsplit("/", 1)[-1], got[0], len(got[1]))


__all__ = ["CHECKPOINT_READY_WAIT", "GuestApiLink"]
