"""run-local's live view: the phases in the order the wrapper took them, the guest's latest output.

The status files are the ones a real wrapper writes, in the order it writes them (between
two steps the file names the phase before them, ``boot`` at first); the view is fed exactly
as the emulator feeds it, one update per status seen.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from rich.console import Console

from boincvm.cli import run_local as view_module
from boincvm.runlocal.phases import PhaseHistory
from boincvm.runlocal.request import LiveState
from boincvm.wrapper.finish import output_tail
from boincvm.wrapper.status import Phase, StatusReport

B, IN, RS, R, C, S = Phase.BOOT, Phase.INSTALL, Phase.RESTORE, Phase.RUN, Phase.CHECKPOINT, Phase.SUSPENDED
CO, CL, D = Phase.COPY_OUT, Phase.CLEANUP, Phase.DONE


def _feed(history: PhaseHistory, phases: list[Phase], checkpoints: int = 0) -> None:
    for phase in phases:
        history.observe(phase, checkpoints)


def test_a_fresh_start_reads_boot_install_run_once_each() -> None:
    history = PhaseHistory()
    history.new_start()
    # What boincvm_status.json says during a fresh start: the second boot is the file between
    # install and run (the phase before install), not a boot.
    _feed(history, [B, IN, B, R])
    assert history.render() == "boot -> install -> run"
    assert history.current is R


def test_checkpoints_and_suspensions_are_counted_on_run_not_listed() -> None:
    history = PhaseHistory()
    history.new_start()
    _feed(history, [B, IN, B, R])
    history.observe(C, 0)
    assert history.render() == "boot -> install -> run -> checkpoint"  # one under way shows
    history.observe(R, 1)
    _feed(history, [S, S, R, C], 1)
    _feed(history, [R, CO, R, CL, R, D], 2)  # copy-out and cleanup fall back to run between them
    assert (
        history.render()
        == "boot -> install -> run (2 checkpoints, 1 suspension) -> copy-out -> cleanup -> done"
    )


def test_each_start_has_its_own_history_and_a_restore_is_no_boot() -> None:
    history = PhaseHistory()
    history.new_start()
    _feed(history, [B, IN, B, R, C], 0)
    history.observe(R, 1)
    history.observe(C, 1)  # killed in the middle of the second snapshot
    history.new_start()
    history.observe(RS, 1)
    history.observe(B, 1)  # the file between restore and run
    _feed(history, [R, CO, CL, D], 1)
    assert history.per_start() == [
        "boot -> install -> run (1 checkpoint) -> checkpoint",
        "restore -> run -> copy-out -> cleanup -> done",
    ]
    assert history.render().startswith("start 1: boot -> install -> run (1 checkpoint)")


def test_a_checkpoint_that_cannot_be_restored_shows_the_fresh_boot() -> None:
    history = PhaseHistory()
    history.new_start()
    history.observe(RS, 3)
    _feed(history, [B, IN, B, R], 0)  # the wrapper started afresh: a real boot, then install
    assert history.render() == "restore -> boot -> install -> run"


def _plain_view_of(statuses: list[tuple[Phase, str]], capsys: pytest.CaptureFixture[str]) -> str:
    view = view_module._View()
    assert view.live is None  # off a terminal: plain lines
    state = LiveState()
    state.history.new_start()
    for phase, output in statuses:
        state.history.observe(phase, 0)
        state.phase = str(state.history.current)
        state.last_output = output or state.last_output
        view.update(state)
    return capsys.readouterr().err


def test_plain_view_prints_each_phase_once_in_order_and_the_guests_new_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _plain_view_of(
        [(B, ""), (IN, ""), (B, ""), (R, ""), (R, "step 1 of 2"), (R, "step 2 of 2"), (CO, ""), (D, "")],
        capsys,
    )
    assert re.findall(r"phase (\S+)", err) == ["boot", "install", "run", "copy-out", "done"]
    assert re.findall(r"guest: (.*)", err) == ["step 1 of 2", "step 2 of 2"]


def test_plain_view_prints_every_new_line_once_even_several_per_look(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The status file carries the latest lines: two looks may each bring several new ones.
    err = _plain_view_of([(R, "a\nb"), (R, "a\nb\nc\nd"), (R, "b\nc\nd\ne"), (R, "x")], capsys)
    assert re.findall(r"guest: (.*)", err) == ["a", "b", "c", "d", "e", "x"]


def test_live_panel_shows_the_latest_lines_whole_and_escaped() -> None:
    state = LiveState(
        phase="run", last_output="\n".join(f"line {n}" for n in range(6)) + "\n\x1b[2Jboom " + "x" * 200
    )
    state.history.new_start()
    _feed(state.history, [B, IN, B, R])
    console = Console(width=400, record=True, color_system=None)
    console.print(view_module._panel(state))
    text = console.export_text()
    assert "boot -> install -> run" in text
    assert "line 3" not in text and "line 4" in text and "line 5" in text  # the last three
    assert "\x1b" not in text and "\\x1b[2Jboom" in text  # a guest cannot drive the terminal
    assert "x" * 80 + "..." in text and "x" * 90 not in text  # cut to 100 characters


def test_stderr_tail_of_the_guest_output_starts_at_a_line() -> None:
    out = "".join(f"line {n:02d} {'.' * 80}\n" for n in range(40)).encode()
    tail = output_tail(out, b"")
    assert len(tail) <= 2000
    assert tail.startswith("line ") and tail.endswith("line 39 " + "." * 80)
    assert all(len(line) == 88 for line in tail.splitlines())  # whole lines only
    assert output_tail(b"x" * 5000, b"").startswith("...x")  # one over-long line: its end
    assert output_tail(b"abc", b"oops\n") == "abc\noops"


def test_the_wrappers_list_of_steps_keeps_a_step_no_sample_caught() -> None:
    # A fresh start whose install was over between two looks: the samples read boot then run,
    # the file's own list of steps has the install.
    history = PhaseHistory()
    history.new_start()
    history.observe(B, 0, [B])
    history.observe(R, 0, [B, IN, R])
    history.observe(C, 0, [B, IN, R])  # an excursion keeps the steps and shows while under way
    assert history.render() == "boot -> install -> run -> checkpoint"
    history.observe(D, 1, [B, IN, R, CO, CL, D])
    assert history.render() == "boot -> install -> run (1 checkpoint) -> copy-out -> cleanup -> done"
    # A restore that failed: the wrapper's list says it booted afresh.
    history.new_start()
    history.observe(R, 0, [RS, B, IN, R])
    assert history.per_start()[-1] == "restore -> boot -> install -> run"


def test_the_status_file_lists_each_step_entered_once_excursions_aside(tmp_path: Path) -> None:
    status = StatusReport()
    for phase in (B, IN, R, C, R, S, R, CO, CL, D):
        status.enter(phase)
    assert status.steps == [B, IN, R, CO, CL, D]
    status.write(tmp_path)
    back = StatusReport.read(tmp_path)
    assert back is not None and back.steps == status.steps and back.phase is D
    (tmp_path / "boincvm_status.json").write_text('{"steps": ["boot", "nope", 3, "run"]}')
    back = StatusReport.read(tmp_path)
    assert back is not None and back.steps == [B, R]
