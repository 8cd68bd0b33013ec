"""The slot's checkpoint record: which snapshot is the last committed checkpoint.

The crash invariant: a checkpoint exists only once ``boincvm_checkpoint.json`` names it,
written with fsync and an atomic rename after the snapshot completed; so a wrapper killed
at any instant, even mid-snapshot, resumes from the last committed one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from boincvm.atomicdir import write_file_atomically
from boincvm.job import CheckpointMode

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "boincvm_checkpoint.json"


@dataclass(frozen=True)
class CheckpointRecord:
    """What ``boincvm_checkpoint.json`` says: the last committed checkpoint of this slot.

    ``snapshot`` names the VM snapshot, or (``mode`` :attr:`CheckpointMode.APP`) the slot
    directory that holds the program's own checkpoint files, saved under their index in the
    job's list (see :mod:`.app_checkpoint`). On disk ``mode`` is the mode's value.
    """

    snapshot: str
    guest_pid: int
    sequence: int
    cpu_time: float
    elapsed: float
    checkpoints: int = 1
    mode: CheckpointMode = CheckpointMode.VM
    #: The program's fraction done (0..1) when the checkpoint was taken: reported again
    #: at once when the task resumes from it (records older than the field: 0).
    fraction_done: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The record as ``boincvm_checkpoint.json`` holds it."""
        return {**asdict(self), "mode": self.mode.value}

    @classmethod
    def from_json(cls, data: object) -> CheckpointRecord:
        """The record a parsed ``boincvm_checkpoint.json`` holds (a missing mode is ``vm``).

        Raises:
            TypeError: it is not an object of the record's fields.
            ValueError: its mode is not a checkpoint mode.
        """
        if not isinstance(data, dict):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        fields = {k: v for k, v in data.items() if k != "mode"}
        return cls(**fields, mode=CheckpointMode(data.get("mode", CheckpointMode.VM.value)))


class CheckpointStore:
    """Reads and atomically commits the checkpoint record of a slot."""

    def __init__(self, slot_dir: Path) -> None:
        self.path = slot_dir / CHECKPOINT_FILE

    def load(self) -> CheckpointRecord | None:
        """The committed record, or None (none yet, or an unreadable one: start afresh)."""
        try:
            return CheckpointRecord.from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable %s (%s); starting the job afresh", self.path.name, exc)
            return None

    def commit(self, record: CheckpointRecord) -> None:
        """Write the record durably: temp file, fsync, rename, fsync of the directory."""
        write_file_atomically(self.path, json.dumps(record.to_json()).encode("utf-8"))

    def clear(self) -> None:
        """Forget the checkpoint (the job is over)."""
        self.path.unlink(missing_ok=True)
