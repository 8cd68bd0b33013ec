"""Errors of the BOINC protocol layer (branches of :mod:`boincvm.errors`)."""

from __future__ import annotations

from boincvm.boinc.files import LOCK_BUSY_DELAY, LOCK_BUSY_REASON
from boincvm.errors import BoincvmError


class BoincApiError(BoincvmError):
    """The app side cannot talk to the client: shared memory missing or unusable."""


class SlotLocked(BoincApiError):
    """Another process holds ``boinc_lockfile`` in this slot.

    BOINC's API answers this with a temporary exit; so should the wrapper:
    ``return app.temporary_exit(err.delay, err.reason)``.

    Attributes:
        delay: seconds the client should wait before restarting the task (600).
        reason: the reason to put in the temporary-exit file.
    """

    def __init__(self, message: str, *, delay: int = LOCK_BUSY_DELAY, reason: str = LOCK_BUSY_REASON) -> None:
        super().__init__(message, hint="another instance of the app may still run in this slot")
        self.delay = delay
        self.reason = reason


class ClientError(BoincvmError):
    """run-local's client (the emulator or the real one) cannot set up or run the task: a file
    of the task is missing, the task is not running, the client timed out (exit code 9)."""

    exit_code = 9
    default_hint = "check the workunit and app version with 'boincvm validate'; --debug shows more"


class ClientTimeout(ClientError):
    """A bounded wait of the local client emulator ran out."""
