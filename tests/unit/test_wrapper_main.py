"""The wrapper's entry point: what an init failure leaves for the real client to report."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from boincvm.boinc.files import FINISH_FILE, ExitCode
from boincvm.boinc.init_data import InitData, write_init_data
from boincvm.wrapper.main import main


def test_init_failure_writes_reason_and_hint_to_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without <api_version> the 7.20.5 client gives a System V shm key and the task ends
    with exit 206; the client then reports stderr.txt only (not the finish file's message),
    so the hint must be there."""
    write_init_data(tmp_path / "init_data.xml", InitData(shm_key=16819261))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("signal.signal", lambda *_: None)  # leave pytest's SIGTERM alone
    with caplog.at_level(logging.ERROR):
        code = main([])
    assert code == int(ExitCode.INIT_FAILURE) == 206
    assert "System V shared memory" in caplog.text
    assert "hint: declare <api_version>" in caplog.text
    assert (tmp_path / FINISH_FILE).exists()
