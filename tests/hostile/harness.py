"""The frame of the hostile-input corpus: a canary-guarded sandbox and the verdicts a refusal must meet.

Every case runs ``boincvm`` (in-process as the console script does, or as a child process
where the case needs a signal, a resource limit or a hang guard) with its working directory
inside ``sandbox.work``. Before the run the whole sandbox tree is recorded (type, mode, size,
md5, link target); ``sandbox.canary`` holds host files an attacker would name (``secret``).

A refusal must: exit with the documented code, print one ``error:`` sentence that matches,
print a ``hint:`` line, show no traceback, and leave the tree exactly as it was (nothing
written, nothing half-written, no input changed or removed). Since nothing new appears, no
byte of a canary file can have reached an artefact either.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from boincvm.cli import main

SECRET = b"CANARY-5e1f0c2a host secret that must never reach an artefact\n"

Entry = tuple[str, int, int, str]  # kind, mode, size, md5 or link target


@dataclass(frozen=True)
class Outcome:
    """What one run of boincvm did."""

    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def tree(root: Path) -> dict[str, Entry]:
    """Every path under ``root`` (symlinks not followed) with what identifies its content."""
    found: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", 0, 0, str(p.readlink()))
            elif stat.S_ISREG(st.st_mode):
                found[rel] = ("file", st.st_mode, st.st_size, hashlib.md5(p.read_bytes()).hexdigest())
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", st.st_mode, 0, "")
            else:
                found[rel] = ("other", st.st_mode, 0, "")
    return found


class Sandbox:
    """A directory tree a hostile case runs in, with canary files outside its work directory."""

    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root = root
        self.work = root / "work"
        self.canary = root / "canary"
        self.work.mkdir()
        self.canary.mkdir()
        self.secret = self.canary / "secret"
        self.secret.write_bytes(SECRET * 64)
        self._capsys = capsys
        self.before: dict[str, Entry] = {}

    @contextmanager
    def _in_work(self) -> Iterator[None]:
        old = Path.cwd()
        os.chdir(self.work)
        try:
            yield
        finally:
            os.chdir(old)

    def run(self, argv: list[str]) -> Outcome:
        """Run boincvm in-process (as the console script does) from ``work``; record the tree first."""
        self.before = tree(self.root)
        self._capsys.readouterr()
        with self._in_work(), pytest.raises(SystemExit) as exited:
            main(list(argv))
        captured = self._capsys.readouterr()
        code = exited.value.code
        return Outcome(code if isinstance(code, int) else 1, captured.out, captured.err)

    def run_process(
        self, argv: list[str], *, timeout: float = 120, env: dict[str, str] | None = None
    ) -> Outcome:
        """Run ``python -m boincvm`` as a child process (for hangs, signals, limits)."""
        self.before = tree(self.root)
        full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120", **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", "boincvm", *argv],
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            check=False,
        )
        return Outcome(proc.returncode, proc.stdout, proc.stderr)

    def changes(self) -> list[str]:
        """What differs from the tree recorded before the last run, one line per path."""
        after = tree(self.root)
        lines = [f"new {p}" for p in sorted(after.keys() - self.before.keys())]
        lines += [f"gone {p}" for p in sorted(self.before.keys() - after.keys())]
        both = sorted(after.keys() & self.before.keys())
        lines += [f"changed {p}" for p in both if after[p] != self.before[p]]
        return lines

    def assert_refused(self, outcome: Outcome, code: int, sentence: str) -> None:
        """The run was refused cleanly: exit ``code``, an error sentence matching ``sentence``
        (a regular expression, searched case-insensitively), a hint, no traceback, tree unchanged."""
        assert_clean_refusal(outcome, code, sentence)
        changed = self.changes()
        assert not changed, f"a refusal changed the sandbox: {changed}\n{outcome}"


def assert_clean_refusal(outcome: Outcome, code: int, sentence: str) -> None:
    """Exit code, sentence, hint and no traceback; for cases whose tree check is done elsewhere."""
    assert outcome.code == code, f"expected exit {code}\n{outcome}"
    assert "Traceback" not in outcome.err and "internal error" not in outcome.err, str(outcome)
    errors = [line for line in outcome.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error sentence\n{outcome}"
    assert re.search(sentence, errors[0], re.IGNORECASE), f"sentence does not match {sentence!r}\n{outcome}"
    assert any(line.startswith("hint: ") for line in outcome.err.splitlines()), f"no hint line\n{outcome}"
    assert "\x1b" not in outcome.err, f"raw escape sequence on the terminal\n{outcome!r}"


@pytest.fixture
def sandbox(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """A fresh canary-guarded sandbox; colour off and a fixed width so messages compare as text."""
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "120")
    return Sandbox(tmp_path, capsys)
