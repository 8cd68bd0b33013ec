"""The slot's checkpoint record: what a resumed task takes up, from this wrapper or an older one."""

from __future__ import annotations

import json
from pathlib import Path

from boincvm.job import CheckpointMode
from boincvm.wrapper.checkpoint import CHECKPOINT_FILE, CheckpointRecord, CheckpointStore


def test_the_record_keeps_the_fraction_done_across_a_commit(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    record = CheckpointRecord("boincvm-ck3-abc123", 108, 3, 12.5, 40.0, checkpoints=3, fraction_done=0.42)
    store.commit(record)
    assert store.load() == record


def test_a_record_an_older_wrapper_wrote_resumes_at_0_percent(tmp_path: Path) -> None:
    older = {"snapshot": "ck4", "guest_pid": 108, "sequence": 4, "cpu_time": 3.17, "elapsed": 12.6}
    (tmp_path / CHECKPOINT_FILE).write_text(json.dumps(older))
    loaded = CheckpointStore(tmp_path).load()
    assert loaded is not None
    assert (loaded.snapshot, loaded.fraction_done, loaded.mode) == ("ck4", 0.0, CheckpointMode.VM)


def test_an_unreadable_record_starts_the_job_afresh(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_FILE).write_text('{"snapshot": "x", "unknown": 1}')
    assert CheckpointStore(tmp_path).load() is None
