"""What ``boincvm run-local`` shows of a real guest run: the phases in the wrapper's order,
the guest program's output while it runs, and its tail in the task's stderr.txt cut at a line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest
from boincvm.cli import cli
from boincvm.runlocal.request import LiveState
from boincvm.workunit.make import InputSpec
from boincvm.wrapper.finish import OUTPUT_TAIL_CHARS
from boincvm.wrapper.status import Phase
from tests.integration.jobs import bound, task_log
from tests.integration.test_run_local import make_wu, qemu_pids_under, run

pytestmark = pytest.mark.integration

#: 40 lines of 88 characters: more than the tail keeps, so the cut falls inside a line.
LINES = 40
PROGRAM = '-c "i=0; while [ $i -lt 40 ]; do echo line $i ' + "." * 80 + '; i=$((i+1)); done; echo ok > out"'
#: Prints a line, then waits (bounded, on the guest's clock) for a trickle-down message,
#: which the test sends once run-local's view has shown that line: the program cannot end
#: before its output was seen, however slow the host.
LIVE_WAIT_TURNS = int(bound(120) / 0.2)
LIVE_SCRIPT = f"""echo "line 1"
i=0
while [ "$i" -lt {LIVE_WAIT_TURNS} ]; do
  for f in "$BOINCVM_API_DIR"/trickle_down/*; do
    [ -e "$f" ] && {{ echo "line 2"; echo ok > out; exit 0; }}
  done
  sleep 0.2
  i=$((i + 1))
done
echo "no trickle-down message came" >&2
exit 3
"""
#: The order the wrapper takes its steps in (a fresh start).
ORDER = [p.value for p in (Phase.BOOT, Phase.INSTALL, Phase.RUN, Phase.COPY_OUT, Phase.CLEANUP, Phase.DONE)]


@pytest.fixture(scope="module")
def app_version(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("av") / "app-version"
    package_image(AppVersionRequest(image=guest_image, app_name="itest", version="1.00", output_dir=out))
    return out


def test_run_local_shows_phases_in_order_and_the_guest_output(
    app_version: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    wu = make_wu(tmp_path, PROGRAM)
    data_dir, results = tmp_path / "client", tmp_path / "results"
    args = ["run-local", str(wu), "--app-version", str(app_version), "--results", str(results)]
    args += ["--data-dir", str(data_dir), "--checkpoint-period", "3600", "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert qemu_pids_under(data_dir) == []
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)

    # Phases: each once, in the wrapper's order (a short one may fall between two looks).
    (phases,) = summary["phases"]
    steps = phases.split(" -> ")
    assert steps[:2] == ["boot", "install"] and steps[-1] == "done", phases
    assert steps == [p for p in ORDER if p in steps], phases
    shown = re.findall(r"phase (\S+)  \(", result.stderr)[1:]  # the plain view's, after "starting"
    assert shown == [p for p in ORDER if p in shown], result.stderr

    # The guest's output reaches the view (the wrapper reports it once the program has ended).
    last = f"line {LINES - 1} " + "." * 80
    assert f"guest: {last}" in result.stderr

    # The tail in the task's stderr.txt starts at a line and ends with the program's last one.
    log = (results / "stderr.txt").read_text(encoding="utf-8")
    _, header, after = log.partition("guest program output (tail):\n")
    assert header, log
    tail = after.splitlines()[: OUTPUT_TAIL_CHARS // 88]
    assert tail[0].startswith("line ") and len(tail[0]) == 88, tail[0]
    assert tail[-1] == last
    assert all(re.fullmatch(r"line \d+ \.{80}", line) for line in tail)


def test_the_guest_output_shows_while_the_program_runs(app_version: Path, tmp_path: Path) -> None:
    script = tmp_path / "live.sh"
    script.write_text(LIVE_SCRIPT, encoding="utf-8")
    wu = make_wu(tmp_path, "live.sh", inputs=(InputSpec("live.sh", str(script)),))
    data_dir = tmp_path / "client"
    seen: list[str] = []

    def on_update(state: LiveState) -> None:
        # The view's output comes from the wrapper's status file (boincvm_status.json).
        if seen or state.phase != Phase.RUN.value or "line 1" not in state.last_output.splitlines():
            return
        seen.append(state.last_output)
        for slot in (data_dir / "slots").iterdir():  # the run's slot: the wrapper passes it on
            (slot / "trickle_down_go").write_text("go\n", encoding="utf-8")

    summary = run(wu, app_version, data_dir, tmp_path, on_update=on_update)
    assert seen, "the program's first line never showed while it ran: " + summary.stderr_tail
    assert summary.ok, summary.message + summary.stderr_tail
    assert "line 2" not in seen[0]
    _, header, after = task_log(summary).partition("guest program output (tail):\n")
    assert header, task_log(summary)
    assert after.splitlines()[:2] == ["line 1", "line 2"], after
