"""BoincApp and LocalClient as two real processes talking through a real boinc_mmap_file."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from boincvm.boinc.client import ClientOptions, LocalClient
from boincvm.boinc.files import FINISH_FILE, ExitCode, FinishFile, TemporaryExit, read_soft_link
from boincvm.boinc.init_data import read_init_data
from boincvm.boinc.outcome import OutcomeKind, TaskState
from boincvm.boinc.slot import LocalTask, OutputFile, TaskFile

APP = Path(__file__).with_name("boinc_test_app.py")
FAST = ClientOptions(poll_period=0.1, checkpoint_period=0.5, launcher=(sys.executable,))


def _task(tmp_path: Path, args: str, **kw: Any) -> LocalTask:
    data = tmp_path / "input.txt"
    data.write_text("hello input")
    events = tmp_path / "events.jsonl"
    return LocalTask(
        app_name="testapp",
        wu_name="wu1",
        result_name="wu1_0",
        app_files=(TaskFile(APP, "testapp_1.00.py", main_program=True, executable=True),),
        input_files=(TaskFile(data, "wu1_in", open_name="in"),),
        output_files=(OutputFile("wu1_0_out", open_name="out", max_nbytes=10_000),),
        command_line=f"--events '{events}' {args}",
        **kw,
    )


def _events(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _names(tmp_path: Path) -> list[str]:
    return [e["event"] for e in _events(tmp_path)]


def _wait_event(tmp_path: Path, name: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in _events(tmp_path):
            if e["event"] == name:
                return e
        time.sleep(0.05)
    raise AssertionError(f"no {name!r} event; saw {_names(tmp_path)}")


def test_task_runs_to_success_with_status_heartbeats_links_and_outputs(tmp_path: Path) -> None:
    task = _task(tmp_path, "--seconds 1.5")
    with LocalClient(tmp_path / "data", task, options=FAST) as client:
        client.start()
        slot = client.slot_dir
        assert (slot / "boinc_mmap_file").stat().st_size == 8192
        assert read_soft_link(slot / "in") == "../../projects/127.0.0.1_boincvm/wu1_in"
        assert (
            slot / "out"
        ).read_text() == "<soft_link>../../projects/127.0.0.1_boincvm/wu1_0_out</soft_link>\n"
        init = read_init_data(slot / "init_data.xml")
        assert (init.shm_key, init.slot, init.result_name, init.app_files) == (
            -1,
            0,
            "wu1_0",
            ("testapp_1.00.py",),
        )
        seen = client.wait(15, until=lambda s: s.fraction_done > 0.3 and s.checkpoint_cpu_time > 0)
        assert seen is None
        mid = client.status
        assert 0.3 < mid.fraction_done < 1.0
        assert mid.current_cpu_time >= mid.checkpoint_cpu_time > 0
        assert mid.fpops_cumulative is not None and mid.fpops_cumulative > 0
        assert "<checkpoint_cpu_time>" in (slot / "boinc_task_state.xml").read_text()
        outcome = client.wait(15)
    assert outcome is not None
    assert outcome.kind is OutcomeKind.SUCCESS and outcome.ok and not outcome.will_restart
    assert outcome.exit_code == 0
    assert outcome.finish == FinishFile(0, "all good", False)
    assert outcome.status.fraction_done == 1.0  # the final status reached the client
    assert outcome.status.current_cpu_time == pytest.approx(1.5, abs=0.2)
    assert outcome.status.state is TaskState.EXITED
    start = _wait_event(tmp_path, "start")
    assert start["input"] == "hello input" and start["standalone"] is False
    beat = _wait_event(tmp_path, "heartbeat")
    assert beat["max_wss"] > 0
    [out] = outcome.outputs
    assert out.error is None and out.path.read_text().startswith("done after")
    assert list((tmp_path / "data/slots/0").iterdir()) == []  # the client cleans the slot


def test_suspend_resume_then_quit_restarts_with_checkpoint_cpu(tmp_path: Path) -> None:
    with LocalClient(tmp_path / "data", _task(tmp_path, "--mode forever"), options=FAST) as client:
        client.start()
        client.wait(10, until=lambda s: s.checkpoint_cpu_time > 0.4)
        client.suspend()
        ev = _wait_event(tmp_path, "control")
        assert ev["requests"] == "Control.SUSPEND" and ev["suspended"] is True
        frozen = client.status.current_cpu_time
        time.sleep(0.6)
        client.poll()
        assert client.status.current_cpu_time == pytest.approx(
            frozen, abs=0.11
        )  # no progress while suspended
        client.resume()
        client.wait(10, until=lambda s: s.current_cpu_time > frozen + 0.3)
        checkpoint = client.status.checkpoint_cpu_time
        client.quit()
        outcome = client.wait(10)
        assert outcome is not None and outcome.kind is OutcomeKind.QUIT and outcome.will_restart
        assert outcome.exit_code == 0 and outcome.finish is None
        assert "quit" in _names(tmp_path)
        # restart in the same slot: the app gets the checkpoint CPU time back
        checkpoint = client.status.checkpoint_cpu_time
        client.start()
        starts = [e for e in _events(tmp_path) if e["event"] == "start"]
        deadline = time.monotonic() + 10
        while len(starts) < 2 and time.monotonic() < deadline:
            client.poll()
            time.sleep(0.05)
            starts = [e for e in _events(tmp_path) if e["event"] == "start"]
        assert starts[1]["wu_cpu_time"] == pytest.approx(checkpoint, abs=1e-6)
        assert client.status.starts == 2
        client.abort()
        outcome = client.wait(10)
    assert outcome is not None and outcome.kind is OutcomeKind.ABORTED and not outcome.will_restart
    assert outcome.exit_code == ExitCode.ABORTED_BY_CLIENT
    assert int(ExitCode.ABORTED_BY_CLIENT) == 194
    assert _names(tmp_path)[-1] == "abort"


def test_temporary_exit_and_compute_error(tmp_path: Path) -> None:
    with LocalClient(
        tmp_path / "a", _task(tmp_path, "--seconds 0.3 --mode temporary_exit"), options=FAST
    ) as client:
        client.start()
        outcome = client.wait(10)
    assert outcome is not None and outcome.kind is OutcomeKind.TEMPORARY_EXIT and outcome.will_restart
    assert outcome.temporary_exit == TemporaryExit(7, "waiting for the hypervisor", True)
    with LocalClient(tmp_path / "b", _task(tmp_path, "--seconds 0.3 --mode error"), options=FAST) as client:
        outcome = client.run(20)
    assert outcome.kind is OutcomeKind.COMPUTE_ERROR and outcome.exit_code == 3
    assert outcome.finish == FinishFile(3, None, False) and not outcome.ok


def test_kill_restarts_and_premature_exit_restarts(tmp_path: Path) -> None:
    with LocalClient(tmp_path / "data", _task(tmp_path, "--mode forever"), options=FAST) as client:
        client.start()
        _wait_event(tmp_path, "start")
        client.kill()
        outcome = client.wait(10)
        assert outcome is not None and outcome.kind is OutcomeKind.KILLED and outcome.will_restart
        assert outcome.signal == 9 and outcome.exit_code is None
        # a crash that leaves no finish file: the lockfile of the dead app must not block the next run
        client.start()
        client.wait(10, until=lambda s: s.status_messages > 0)
        assert "slot_locked" not in _names(tmp_path)
        client.kill(15)
        outcome = client.wait(10)
    assert outcome is not None and outcome.kind is OutcomeKind.KILLED and outcome.signal == 15


def test_app_notices_lost_heartbeat_within_bound(tmp_path: Path) -> None:
    options = ClientOptions(poll_period=0.1, launcher=(sys.executable,), client_pid=0)
    task = _task(tmp_path, "--mode forever --heartbeat-timeout 1.5")
    with LocalClient(tmp_path / "data", task, options=options) as client:
        client.start()
        client.wait(10, until=lambda s: s.heartbeats_sent > 3 and s.status_messages > 0)
        time.sleep(0.3)
        assert "client_gone" not in _names(tmp_path)  # heartbeats keep it alive
        client.poll()  # the last heartbeat
        client.heartbeats_enabled = False
        stopped = time.monotonic()
        outcome = client.wait(10)
    gone = _wait_event(tmp_path, "client_gone")
    assert 1.5 - 0.2 < gone["t"] - stopped < 1.5 + 1.0  # the app ticks every 0.05 s
    assert outcome is not None and outcome.kind is OutcomeKind.PREMATURE_EXIT and outcome.will_restart


def test_app_notices_client_pid_gone(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    options = ClientOptions(poll_period=0.1, launcher=(sys.executable,), client_pid=dead.pid)
    task = _task(tmp_path, "--mode forever --client-check 0.3")
    with LocalClient(tmp_path / "data", task, options=options) as client:
        client.start()
        outcome = client.wait(10)
    assert outcome is not None and outcome.kind is OutcomeKind.PREMATURE_EXIT
    assert "client_gone" in _names(tmp_path)


def test_living_client_pid_is_not_gone(tmp_path: Path) -> None:
    task = _task(tmp_path, "--mode finish --seconds 1.2 --client-check 0.2")
    with LocalClient(tmp_path / "data", task, options=FAST) as client:
        outcome = client.run(20)
    assert outcome.kind is OutcomeKind.SUCCESS
    assert "client_gone" not in _names(tmp_path)


def test_second_instance_in_slot_makes_temporary_exit(tmp_path: Path) -> None:
    with LocalClient(tmp_path / "data", _task(tmp_path, "--mode forever"), options=FAST) as client:
        client.start()
        client.wait(10, until=lambda s: s.status_messages > 0)
        intruder = subprocess.run(
            [sys.executable, str(APP), "--events", str(tmp_path / "events.jsonl"), "--lock-timeout", "0.3"],
            cwd=client.slot_dir,
            timeout=30,
            check=False,
        )
        assert intruder.returncode == 0
        assert "slot_locked" in _names(tmp_path)
        text = (client.slot_dir / "boinc_temporary_exit").read_text()
        assert text == "600\nWaiting to acquire slot directory lock.  Another instance may be running.\n"
        assert not (client.slot_dir / FINISH_FILE).exists()
        client.abort()
        client.wait(10)


def test_standalone_mode_without_init_data(tmp_path: Path) -> None:
    (tmp_path / "in").write_text("plain file")
    done = subprocess.run(
        [sys.executable, str(APP), "--events", str(tmp_path / "events.jsonl"), "--seconds", "0.2"],
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0
    start = _wait_event(tmp_path, "start")
    assert start["standalone"] is True and start["input"] == "plain file"
    assert (tmp_path / "boinc_finish_called").read_text() == "0\nall good\n\n"
    assert (tmp_path / "out").read_text().startswith("done after")
    assert not (tmp_path / "boinc_lockfile").exists()
