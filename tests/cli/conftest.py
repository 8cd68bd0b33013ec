"""Fixtures of the command-line tests: run ``boincvm`` as the console script does."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from boincvm.cli import main

RunFn = Callable[[list[str]], tuple[int, str, str]]


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "120")


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> RunFn:
    """Run boincvm.cli.main as the console script does, returning (exit code, stdout, stderr)."""

    def _run(args: list[str]) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        captured = capsys.readouterr()
        code = exited.value.code
        return (code if isinstance(code, int) else 1), captured.out, captured.err

    return _run
