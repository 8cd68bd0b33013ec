"""Fixtures of the command-line tests: run ``boincvm`` as the console script does."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

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


def make_app_version(root: Path, app: str) -> Path:
    """``root/av``: package-image of a blank 64 MiB raw disk for ``app`` (zip-application wrapper)."""
    img = root / "base.img"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(img), "64M"], check=True, capture_output=True)
    out = root / "av"
    with pytest.raises(SystemExit) as exited:
        main(["-q", "package-image", str(img), "--app", app, "--wrapper", "pyz", "-o", str(out)])
    assert exited.value.code == 0
    return out
