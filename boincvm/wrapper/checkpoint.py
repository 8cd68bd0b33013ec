"""The slot's checkpoint record: which snapshot is the last committed checkpoint.

The crash invariant: a checkpoint exists only once ``boincvm_checkpoint.json`` names it,
written with fsync and an atomic rename after the snapshot completed; so a wrapper killed
at any instant, even mid-snapshot, resumes from the last committed one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "boincvm_checkpoint.json"


@dataclass(frozen=True)
class CheckpointRecord:
    """What ``boincvm_checkpoint.json`` says: the last committed checkpoint of this slot.

    ``snapshot`` names the VM snapshot, or (``mode`` ``app``) the slot directory that holds
    the program's own checkpoint files, saved under their index in the job's list.
    """

    snapshot: str
    guest_pid: int
    sequence: int
    cpu_time: float
    elapsed: float
    checkpoints: int = 1
    mode: str = "vm"


class CheckpointStore:
    """Reads and atomically commits the checkpoint record of a slot."""

    def __init__(self, slot_dir: Path) -> None:
        self.path = slot_dir / CHECKPOINT_FILE

    def load(self) -> CheckpointRecord | None:
        """The committed record, or None (none yet, or an unreadable one: start afresh)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return CheckpointRecord(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable %s (%s); starting the job afresh", self.path.name, exc)
            return None

    def commit(self, record: CheckpointRecord) -> None:
        """Write the record durably: temp file, fsync, rename, fsync of the directory."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(asdict(record), f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def clear(self) -> None:
        """Forget the checkpoint (the job is over)."""
        self.path.unlink(missing_ok=True)
