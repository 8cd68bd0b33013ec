"""The guest program's output as it runs: the launcher and the trim script under the shells
guests have, the tail cut at a line, the lines made safe for a terminal, what a task keeps
of the file across surveys and trims, and hostile output through the whole wrapper."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from boincvm.hypervisor.base import ProcessStatus, VmSpec
from boincvm.wrapper.guest_contract import GuestFileKind, Survey
from boincvm.wrapper.guest_output import (
    OUTPUT_READ_BYTES,
    STATUS_LINE_CHARS,
    STATUS_LINES,
    TRIM_PERIOD,
    TRIM_SCRIPT,
    GuestOutput,
    from_line_start,
    last_lines,
    launch_argv,
    output_path,
    shown_line,
)
from boincvm.wrapper.status import StatusReport
from tests.hostile.test_wrapper import LocalBackend, run_wrapper

SHELLS = [pytest.param(["/bin/sh"], id="dash"), pytest.param(["busybox", "sh"], id="busybox-ash")]


def _sh(shell: list[str], argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    assert argv[0] == "/bin/sh"
    if shutil.which(shell[0]) is None:
        raise AssertionError(f"{shell[0]} is not installed: scripts/bootstrap.sh installs it")
    return subprocess.run([*shell, *argv[1:]], capture_output=True, timeout=30, check=False)


# -- where the file is, and the launcher ---------------------------------------------------


def test_the_output_file_is_beside_the_jobs_directory_never_in_it() -> None:
    assert output_path("/scratch/boincvm") == "/scratch/boincvm.wrapper/output.log"
    assert output_path("/scratch/boincvm/") == "/scratch/boincvm.wrapper/output.log"
    assert output_path("/") == "/boincvm.wrapper/output.log"
    for exec_dir in ("/scratch/boincvm", "/container"):
        assert not output_path(exec_dir).startswith(exec_dir.rstrip("/") + "/")


@pytest.mark.parametrize("shell", SHELLS)
def test_the_launcher_appends_both_streams_in_order_and_keeps_the_exit_status(
    tmp_path: Path, shell: list[str]
) -> None:
    log = output_path(str(tmp_path / "job"))
    prog = ["/bin/sh", "-c", 'echo "$1"; echo err >&2; printf "no newline"; exit 3', "prog", "a  b 'c'"]
    first = _sh(shell, launch_argv(log, prog))
    assert (first.returncode, first.stdout, first.stderr) == (3, b"", b"")
    again = _sh(shell, launch_argv(log, ["/bin/sh", "-c", "echo again"]))  # a restart appends
    assert again.returncode == 0
    assert Path(log).read_bytes() == b"a  b 'c'\nerr\nno newlineagain\n"


@pytest.mark.parametrize("shell", SHELLS)
def test_a_launcher_that_cannot_write_the_file_leaves_the_output_where_it_went(
    tmp_path: Path, shell: list[str]
) -> None:
    (tmp_path / "job").write_text("a file where the directory would go")
    log = output_path(str(tmp_path / "job" / "sub"))
    done = _sh(shell, launch_argv(log, ["/bin/sh", "-c", "echo still runs"]))
    assert done.returncode == 0
    assert done.stdout == b"still runs\n"
    assert log.encode() in done.stderr  # why, in the tail the wrapper logs


# -- the trim script -------------------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_the_trim_empties_only_a_regular_file_over_the_cap(tmp_path: Path, shell: list[str]) -> None:
    def trim(path: Path, cap: int) -> bytes:
        done = _sh(shell, ["/bin/sh", "-c", TRIM_SCRIPT, "boincvm-trim", str(path), str(cap)])
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    log = tmp_path / "output.log"
    log.write_bytes(b"x" * 100)
    assert trim(log, 100) == b""
    assert log.stat().st_size == 100
    assert trim(log, 99) == b"emptied"
    assert log.stat().st_size == 0
    assert trim(tmp_path / "missing", 0) == b""
    target = tmp_path / "precious"
    target.write_bytes(b"y" * 100)
    (tmp_path / "link").symlink_to(target)
    assert trim(tmp_path / "link", 0) == b""
    os.mkfifo(tmp_path / "fifo")
    assert trim(tmp_path / "fifo", 0) == b""  # never opened: it would block
    assert target.read_bytes() == b"y" * 100


# -- the pure parts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "limit", "expected"),
    [
        pytest.param(b"a\nb\n", 10, b"a\nb\n", id="all-fits"),
        pytest.param(b"aaaa\nbb\ncc\n", 5, b"cc\n", id="cut-inside-a-line"),
        pytest.param(b"aaa\nbb\ncc\n", 6, b"bb\ncc\n", id="cut-at-a-line-start"),
        pytest.param(b"x" * 20, 10, b"..." + b"x" * 7, id="one-long-line"),
    ],
)
def test_the_tail_starts_at_a_line(data: bytes, limit: int, expected: bytes) -> None:
    assert from_line_start(data, limit) == expected


def test_a_shown_line_is_safe_for_a_terminal_and_bounded() -> None:
    assert shown_line("\x1b]0;title\x07\x1b[1;31mred\x1b[0m text") == "red text"
    assert shown_line("10%\r20%\r30%\r\n") == "30%"  # a counter rewritten in place
    assert shown_line("a\tb\x00c\x9bd\x7f") == "a   b?c?"  # C1 CSI: dropped as an escape
    assert shown_line("bell\x07 and \x08back") == "bell? and ?back"
    long = shown_line("y" * 10_000)
    assert len(long) == STATUS_LINE_CHARS and long.endswith("...")


def test_the_last_lines_are_whole_and_newest_last() -> None:
    data = b"".join(b"line %d\n" % i for i in range(10)) + b"\n  \nhalf a li"
    running = last_lines(data, ended=False)
    assert running.splitlines() == [f"line {i}" for i in range(10 - STATUS_LINES, 10)]
    assert last_lines(data, ended=True).splitlines()[-1] == "half a li"
    assert last_lines(b"no newline yet", ended=False) == ""
    assert last_lines(b"caf\xc3\xa9 \xff\n", ended=False) == "caf\u00e9 \ufffd"


# -- what a task keeps of the file -----------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _survey(out: GuestOutput, data: bytes | None) -> Survey:
    if data is None:
        return Survey({out.path: GuestFileKind.MISSING}, {})
    return Survey({out.path: GuestFileKind.FILE}, {out.path: data[-(OUTPUT_READ_BYTES + 1) :]})


def _output(tmp_path: Path, clock: _Clock) -> GuestOutput:
    vm = LocalBackend(VmSpec(name="t", workdir=tmp_path / "vm"))
    return GuestOutput(vm, str(tmp_path / "job"), clock)


def test_the_task_keeps_the_tail_and_falls_back_to_the_capture(tmp_path: Path) -> None:
    out = _output(tmp_path, _Clock())
    running = ProcessStatus(running=True)
    assert out.recent(ProcessStatus(running=False, stdout_tail=b"captured\n")) == "captured"
    out.take(_survey(out, b"one\ntwo\n"), running=True)
    out.take(_survey(out, None), running=True)  # a survey without the file changes nothing
    assert out.recent(running) == "one\ntwo"
    big = b"".join(b"%05d\n" % i for i in range(2000))
    out.take(_survey(out, big), running=True)
    assert out.tail.startswith(b"0") and out.tail.endswith(b"01999\n")
    assert len(out.tail) <= OUTPUT_READ_BYTES
    ended = ProcessStatus(running=False, exit_code=0, stderr_tail=b"launcher note\n")
    assert out.final(ended) == (out.tail, b"launcher note\n")


def test_an_emptied_file_keeps_the_lines_read_before(tmp_path: Path) -> None:
    clock = _Clock()
    out = _output(tmp_path, clock)
    path = Path(out.path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * (17 * 1024 * 1024 - 6) + b"\nold\n")
    clock.now = TRIM_PERIOD - 1
    out.take(_survey(out, path.read_bytes()), running=True)
    assert path.stat().st_size > 0  # not yet due
    clock.now = TRIM_PERIOD
    out.take(_survey(out, path.read_bytes()), running=True)
    assert path.stat().st_size == 0
    with path.open("ab") as f:
        f.write(b"new\n")
    out.take(_survey(out, path.read_bytes()), running=True)
    assert out.recent(ProcessStatus(running=True)).splitlines()[-2:] == ["old", "new"]
    assert out.tail == b"old\nnew\n"


# -- the whole wrapper on a stand-in backend whose guest is this host -------------------------


def test_hostile_program_output_reaches_the_status_file_escaped_and_bounded(tmp_path: Path) -> None:
    script = (
        "printf 'first\\n\\033]0;title\\007\\033[2J\\033[31mred\\033[0m bell\\007\\n'; "
        "head -c 1000 /dev/zero | tr '\\0' x; printf '\\n\\377\\376 last\\n' >&2; echo ok > out"
    )
    code, _app_, vm = run_wrapper(tmp_path, script)
    assert code == 0
    status = StatusReport.read(tmp_path / "slot")
    assert status is not None
    lines = status.last_output.splitlines()
    assert lines[-3:-1] == ["red bell?", "x" * (STATUS_LINE_CHARS - 3) + "..."]
    assert lines[-1] == "\ufffd\ufffd last"
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", status.last_output)
    # The output went to the wrapper's file beside the job's directory, read by the survey.
    log = tmp_path / "guest.wrapper" / "output.log"
    assert log.read_bytes().startswith(b"first\n") and not (tmp_path / "guest" / "output.log").exists()
    assert str(log) not in {path for path, _ in vm.reads}
