"""The bundled example (examples/hello) made as the README makes it, through the command line."""

from __future__ import annotations

import sys
from pathlib import Path

from boincvm import proc

CHECKOUT = Path(__file__).resolve().parents[1]


def boincvm_cli(*args: str, check: bool = True) -> proc.Completed:
    """The boincvm command line, in a process of its own."""
    return proc.run([sys.executable, "-m", "boincvm", *args], timeout=1800, check=check)


def hello_workunits(
    work: Path, directory: str, *, app: str = "hello", input_path: str | None = None, **options: str
) -> Path:
    """``work/directory``: make-workunit on examples/hello (its RPM made in ``work``).

    ``input_path`` is the input ``in`` (a template in a batch; default examples/hello/world.txt);
    ``options`` are more make-workunit options (``min_quorum="2"`` is ``--min-quorum=2``).
    """
    out = work / directory
    program = str(CHECKOUT / "examples/hello/program")
    rpm = boincvm_cli(
        "package-rpm", program, "--name", "hello", "--version", "1.0", "-o", str(work)
    ).text.strip()
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    inputs = f"in={input_path or CHECKOUT / 'examples/hello/world.txt'}"
    boincvm_cli(
        "make-workunit", "--app", app, "--package", rpm, "--application", "/opt/hello/bin/hello",
        "--input", inputs, "--output", "out:100000", "-o", str(out), *extra,
    )  # fmt: skip
    return out
