"""run-local never reports success for a fault it did not inject: the bundled example, run from
the command line as the README runs it, with one fault whose point the run reaches and one it
cannot (a checkpoint, when the job's 600 s minimum interval outlasts the whole run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.example_hello import boincvm_cli, hello_workunits

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def example(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("example")
    boincvm_cli("package-image", str(guest_image), "--app", "hello", "-o", str(work / "av"))
    hello_workunits(work, "wu")
    return work / "wu", work / "av"


def test_a_fault_the_run_never_reaches_is_named_with_the_checkpoint_interval(
    example: tuple[Path, Path], tmp_path: Path
) -> None:
    wu, av = example
    done = boincvm_cli(
        "run-local", str(wu), "--app-version", str(av), "--results", str(tmp_path / "r"),
        "--data-dir", str(tmp_path / "d"), "--checkpoint-period", "1", "--kill-at", "checkpoint:1", "--json",
        check=False,
    )  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 10, err
    summary = json.loads(done.stdout)
    assert summary["ok"] is True and (tmp_path / "r" / "out").read_text() == "Hello, world!\n"
    assert summary["checkpoint_interval"] == 600
    assert summary["checkpoint_interval_source"] == "boincvm's default minimum_checkpoint_interval"
    (missed,) = summary["faults_missed"]
    assert missed.startswith("--kill-at checkpoint 1 never happened: the run ended after")
    assert "checkpoints come at most every 600 s (boincvm's default minimum_checkpoint_interval)" in missed
    assert "1 of 1 requested faults never happened" in " ".join(err.split())
    assert "Traceback" not in err


def test_a_fault_that_happens_leaves_nothing_missed(example: tuple[Path, Path], tmp_path: Path) -> None:
    wu, av = example
    done = boincvm_cli(
        "run-local", str(wu), "--app-version", str(av), "--results", str(tmp_path / "r"),
        "--data-dir", str(tmp_path / "d"), "--quit-at", "run", "--json",
    )  # fmt: skip
    summary = json.loads(done.stdout)
    assert summary["ok"] is True and summary["faults_missed"] == []
    assert summary["starts"] == 2  # quit at run, then the restart that finished it
    assert summary["checkpoint_interval"] == 600
