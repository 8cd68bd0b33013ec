"""Hostile input to the wrapper: what a guest program writes and what a slot holds.

Three layers:

* the pure readers of the guest program's contract files (:mod:`boincvm.wrapper.guest_contract`)
  on crafted bytes: every value is clamped or ignored with a logged reason, never raised;
* the whole :class:`~boincvm.wrapper.steps.Wrapper` on a stand-in backend whose "guest" is a
  host directory and whose programs are host shell scripts (so the guest's shell really
  runs the kind check), and whose agent fails the test if it is asked to open anything
  but a regular file, as qemu-ga would hang on it;
* the wrapper's entry point on hostile ``init_data.xml`` files and command lines: exit 206
  (``EXIT_INIT_FAILURE``) with the sentence and the hint in ``stderr.txt``, never a traceback.

A few cases run end to end through ``run-local`` with a real QEMU guest (marked
``integration``; run them by name with ``-k``).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from boincvm.boinc.api import AppOptions, BoincApp
from boincvm.boinc.files import (
    FINISH_FILE,
    LOCKFILE,
    ExitCode,
    SlotLock,
    read_finish_file,
    read_temporary_exit,
)
from boincvm.boinc.init_data import HostInfo, InitData
from boincvm.hypervisor.base import (
    Availability,
    Backend,
    BackendKind,
    GuestProcess,
    ProcessStatus,
    VmSpec,
)
from boincvm.job import OutputFile, Task, VmJob, resolve
from boincvm.job.render import render_job
from boincvm.wrapper import guest_contract
from boincvm.wrapper.guest_contract import (
    MAX_TEMPORARY_EXIT_DELAY,
    completion_trigger,
    credit_report,
    fraction_done,
    ops_bound,
    temporary_exit_trigger,
)
from boincvm.wrapper.main import main as wrapper_main
from boincvm.wrapper.steps import Wrapper, WrapperInputs
from tests.integration.test_run_local import app_version, data_dir, run

__all__ = ["app_version", "data_dir"]  # module fixtures reused from the run-local tests

# --------------------------------------------------------------------------------------
# 1. The readers of the contract files, on crafted bytes

FRACTIONS: list[tuple[str, bytes, float | None, str | None]] = [
    # id, file content, value used (None: keep the last one), words of the logged note
    ("inf", b"inf\n", None, "infinite; ignored"),
    ("minus-inf", b"-inf", None, "infinite; ignored"),
    ("nan", b"nan\n", None, r"not a number \(NaN\); ignored"),
    ("overflow", b"1e999", None, "infinite; ignored"),
    ("negative", b"-0.5", 0.0, r"outside \[0, 1\]; clamped to 0"),
    ("above-one", b"7", 1.0, r"outside \[0, 1\]; clamped to 1"),
    ("huge", b"1e300", 1.0, "clamped to 1"),
    ("non-utf8", b"\xff\xfe\x800.25\xff", 0.25, None),
    ("no-number", b"\xff\xfe\x80 progress", None, None),
    ("enormous", b"0.1\n" * 1_000_000 + b"0.75\n", 0.75, None),
    ("last-wins-inf", b"0.5\ninf\n", None, "infinite; ignored"),
]


@pytest.mark.parametrize(("data", "value", "note"), [pytest.param(*c[1:], id=c[0]) for c in FRACTIONS])
def test_fraction_done_is_clamped_or_ignored(data: bytes, value: float | None, note: str | None) -> None:
    got = fraction_done(data)
    assert got.value == value
    if note is None:
        assert got.note is None
    else:
        assert got.note is not None
        assert re.search(note, got.note), got.note


CREDITS: list[tuple[str, bytes, float | None, float | None, str | None]] = [
    # id, content, bound, value used, words of the note
    ("1e300-clamped", b"1e300\n", 1e13, 1e13, "more than the host could have done"),
    ("inf", b"inf", 1e13, None, "infinite; ignored"),
    ("nan", b"NaN", 1e13, None, "NaN"),
    ("overflow", b"1e999", 1e13, None, "infinite; ignored"),
    ("negative", b"-5e9", 1e13, None, "must be at least 0; ignored"),
    ("within", b"5e12", 1e13, 5e12, None),
    ("no-bound", b"1e300", None, 1e300, None),
    ("non-utf8", b"\xc3\x28 3e9 \xff", 1e13, 3e9, None),
]


@pytest.mark.parametrize(("data", "bound", "value", "note"), [pytest.param(*c[1:], id=c[0]) for c in CREDITS])
def test_credit_report_is_clamped_to_what_the_host_could_do(
    data: bytes, bound: float | None, value: float | None, note: str | None
) -> None:
    got = credit_report(data, bound)
    assert got.value == value
    assert (got.note is None) if note is None else (got.note is not None and note in got.note), got.note


def test_ops_bound_takes_the_lesser_of_the_workunit_and_the_host() -> None:
    assert ops_bound(rsc_fpops_bound=1e13, p_fpops=1e9, cpu_time=10) == 1e9 * 10 * 16
    assert ops_bound(rsc_fpops_bound=1e13, p_fpops=0, cpu_time=10) == 1e13
    assert ops_bound(rsc_fpops_bound=0, p_fpops=0, cpu_time=10) is None
    assert ops_bound(rsc_fpops_bound=math.nan, p_fpops=math.inf, cpu_time=10) is None


COMPLETIONS: list[tuple[str, bytes, int, str | None]] = [
    # id, content, exit code used, words of the note
    ("inf", b"inf\n0\nall done\n", 0, "not a number; taken as 0"),
    ("overflow", b"1e999\n", 0, "not a number; taken as 0"),
    ("nan", b"nan", 0, "not a number; taken as 0"),
    ("huge", b"1e300\n", 1, "outside the range of an exit code; taken as 1"),
    ("int-overflow", b"4294967296\n", 1, "taken as 1"),
    ("negative", b"-5\n", -5, None),
    ("non-utf8", b"\xff\xfe\n", 0, "not a number"),
    ("empty", b"", 0, None),
    ("plain", b"3\n", 3, None),
]


@pytest.mark.parametrize(("data", "code", "note"), [pytest.param(*c[1:], id=c[0]) for c in COMPLETIONS])
def test_completion_trigger_never_overflows(data: bytes, code: int, note: str | None) -> None:
    got = completion_trigger(data)
    assert got.exit_code == code
    assert (got.note is None) if note is None else (got.note is not None and note in got.note), got.note


TEMPORARY_EXITS: list[tuple[str, bytes, float, str | None]] = [
    # id, content, delay used, words of the note
    ("inf", b"inf\n", MAX_TEMPORARY_EXIT_DELAY, "clamped to 86400 s"),
    ("overflow", b"1e999\n", MAX_TEMPORARY_EXIT_DELAY, "clamped to 86400 s"),
    ("huge", b"1e300", MAX_TEMPORARY_EXIT_DELAY, "clamped"),
    ("minus-inf", b"-inf", 0.0, "clamped to 0 s"),
    ("negative", b"-10", 0.0, "clamped to 0 s"),
    ("nan", b"nan", 300.0, "not a number; using 300 s"),
    ("words", b"soon\n", 300.0, "not a number"),
    ("empty", b"", 300.0, None),
    ("plain", b"600\n0\nback later\n", 600.0, None),
]


@pytest.mark.parametrize(("data", "delay", "note"), [pytest.param(*c[1:], id=c[0]) for c in TEMPORARY_EXITS])
def test_temporary_exit_delay_is_clamped_to_a_day(data: bytes, delay: float, note: str | None) -> None:
    got = temporary_exit_trigger(data)
    assert got.delay == delay
    assert (got.note is None) if note is None else (got.note is not None and note in got.note), got.note


def test_trigger_messages_are_bounded_and_escaped() -> None:
    got = completion_trigger(b"0\n0\n\x1b[31mred\x1b[0m \xff" + b"x" * 100_000)
    assert "\x1b" not in got.message
    assert len(got.message) <= 1024 + 3
    assert got.message.startswith("?[31mred?[0m \ufffd")


# --------------------------------------------------------------------------------------
# 2. The whole wrapper on a stand-in backend: the "guest" is a host directory


class AgentWouldHang(AssertionError):
    """The wrapper asked the agent to open something qemu-ga's blocking open() would hang on."""


class LocalBackend(Backend):
    """A backend whose guest is this host: programs are host processes, files host files.

    Not registered (no ``kind=``). Its agent refuses to open anything but a regular file
    (qemu-ga would block forever on a FIFO) and records every read's bound.
    """

    kind: ClassVar[BackendKind] = BackendKind.QEMU
    instances: ClassVar[list[LocalBackend]] = []

    def __init__(self, spec: VmSpec) -> None:
        self.spec = spec
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.reads: list[tuple[str, int]] = []
        self.snapshots: list[str] = []
        self.starts = 0
        self.started: list[tuple[str, ...]] = []  # every guest command, in order
        LocalBackend.instances.append(self)

    @classmethod
    def probe(cls) -> Availability:
        return Availability(True, "a stand-in")

    def power_on(self, *, snapshot: str | None = None) -> None:
        self.starts += 1

    def wait_for_tools(self, timeout: float | None = None) -> None:
        return None

    def power_off(self, *, soft_timeout: float = 10.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    def is_running(self) -> bool:
        return True

    def start_program(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None
    ) -> GuestProcess:
        self.started.append(tuple(argv))
        p = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.procs[p.pid] = p
        return GuestProcess(pid=p.pid, argv=tuple(argv))

    def poll_program(self, proc: GuestProcess) -> ProcessStatus:
        p = self.procs[proc.pid]
        if p.poll() is None:
            return ProcessStatus(running=True)
        out, err = p.communicate()
        return ProcessStatus(running=False, exit_code=p.returncode, stdout_tail=out, stderr_tail=err)

    def _open_check(self, guest_path: str) -> None:
        try:
            st = Path(guest_path).stat()
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            raise AgentWouldHang(f"the agent was asked to open {guest_path}, which is not a regular file")

    def copy_to_guest(self, host_path: Path, guest_path: str) -> None:
        Path(guest_path).write_bytes(host_path.read_bytes())

    def copy_from_guest(self, guest_path: str, host_path: Path, *, max_bytes: int | None = None) -> int:
        from boincvm.errors import OutputError, OutputMissing

        self._open_check(guest_path)
        src = Path(guest_path)
        if not src.exists():
            raise OutputMissing(f"guest file {guest_path} does not exist")
        data = src.read_bytes()
        if max_bytes is not None and len(data) > max_bytes:
            raise OutputError(
                f"guest file {guest_path} is {len(data)} bytes, more than the {max_bytes} allowed"
            )
        host_path.write_bytes(data)
        return len(data)

    def read_guest_file(self, guest_path: str, *, max_bytes: int = 65536) -> bytes | None:
        self._open_check(guest_path)
        self.reads.append((guest_path, max_bytes))
        try:
            with open(guest_path, "rb") as f:  # noqa: PTH123 - a bounded read, as the agent does
                return f.read(max_bytes)
        except FileNotFoundError:
            return None

    def snapshot_create(self, name: str) -> None:
        self.snapshots.append(name)

    def snapshot_delete(self, name: str) -> None:
        return None

    def host_cpu_time(self) -> float:
        return 1.0


def _app(slot: Path, init: InitData) -> BoincApp:
    return BoincApp(slot, init, None, SlotLock(slot / LOCKFILE), AppOptions(finish_wait=0))


def run_wrapper(
    tmp_path: Path,
    script: str,
    *,
    outputs: tuple[OutputFile, ...] = (OutputFile("out", 1000),),
    init: InitData | None = None,
    backend: type[LocalBackend] | None = None,
    **task: Any,
) -> tuple[int, BoincApp, LocalBackend]:
    """Run ``/bin/sh -c script`` as the guest program under the real Wrapper; return its exit code."""
    slot = tmp_path / "slot"
    guest = tmp_path / "guest"
    slot.mkdir()
    guest.mkdir()
    job = VmJob(
        vm_kernel="kernel",
        task=Task(application="/bin/sh", command_line=f"-c {script!r}", exec_dir=str(guest), **task),
        output_files=outputs,
        minimum_checkpoint_interval=0,
        disable_automatic_checkpoints=True,
    )
    inputs = WrapperInputs(
        job=resolve(job), wu_args=(), kernel=None, initrd=None, image=None, package=None, inputs=()
    )
    app = _app(slot, init or InitData(project_dir=str(tmp_path / "project")))
    (tmp_path / "project").mkdir(exist_ok=True)
    LocalBackend.instances.clear()
    code = Wrapper(app, inputs, backend or LocalBackend, poll_period=0.1).run()
    return code, app, LocalBackend.instances[-1]


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.INFO):
        yield


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not any(r.exc_info for r in caplog.records), caplog.text
    assert "Traceback" not in caplog.text


# Guest outputs that are not regular files inside the job's directory: refused once, as a
# bad output (the task's exit code is EXIT_CHILD_FAILED), never opened, never retried.
BAD_OUTPUTS = [
    ("fifo", "mkfifo out", "is a FIFO"),
    ("directory", "mkdir out", "is a directory"),
    ("symlink-to-host-file", "ln -s /etc/passwd out", "leads out of the job's directory"),
    ("symlink-to-device", "ln -s /dev/zero out", "leads out of the job's directory"),
    ("symlink-up", "mkdir -p d; ln -s ../../.. d/up; ln -s d/up/etc/hostname out", "leads out"),
    ("symlink-to-fifo-inside", "mkfifo f; ln -s f out", "is a FIFO"),
    ("dangling-symlink-out", "ln -s /nonexistent/x out", "leads out of the job's directory"),
]


@pytest.mark.parametrize(("script", "words"), [pytest.param(*c[1:], id=c[0]) for c in BAD_OUTPUTS])
def test_an_output_that_is_not_a_regular_file_is_a_bad_output_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, script: str, words: str
) -> None:
    code, _app_, vm = run_wrapper(tmp_path, script)
    assert code == int(ExitCode.CHILD_FAILED)
    finish = read_finish_file(tmp_path / "slot")
    assert finish is not None and finish.status == int(ExitCode.CHILD_FAILED)
    assert finish.message is not None and "output out" in finish.message and words in finish.message
    assert read_temporary_exit(tmp_path / "slot") is None, "a bad output is not a VM problem to retry"
    assert vm.starts == 1
    assert not (tmp_path / "slot" / "out").exists()
    _no_traceback(caplog)


def test_a_regular_output_through_a_symlink_inside_is_copied(tmp_path: Path) -> None:
    code, _app_, _vm = run_wrapper(tmp_path, "echo hi > real; ln -s real out")
    assert code == 0
    assert (tmp_path / "slot" / "out").read_bytes() == b"hi\n"


def test_a_short_program_costs_one_survey_and_no_kinds_command(tmp_path: Path) -> None:
    """Guest commands are what a short task pays for (30-100 ms each under TCG): the job's
    and the guest API's directories are made in one, nothing is surveyed at the program's
    start, and the one survey at its end also gives the outputs' kinds, so the copy-out
    asks for none."""
    code, _app_, vm = run_wrapper(tmp_path, "echo hi > out")
    assert code == 0
    assert (tmp_path / "slot" / "out").read_bytes() == b"hi\n"
    shells = [a for a in vm.started if a[:2] == ("/bin/sh", "-c")]
    scripts = [a[2] for a in shells]
    assert scripts.count(guest_contract.SURVEY_SCRIPT) == 1, scripts
    assert guest_contract.KIND_SCRIPT not in scripts
    made = [a[2] for a in shells if "resolve" in a[2]]  # the API's directory, with the job's
    assert len(made) == 1 and made[0].startswith("mkdir -p "), made


class FullDiskBackend(LocalBackend):
    """The slot's disk is full when the results are copied out."""

    def copy_from_guest(self, guest_path: str, host_path: Path, *, max_bytes: int | None = None) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(host_path))


def test_a_full_disk_at_the_copy_out_is_a_temporary_exit_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A write of the wrapper's own that meets ENOSPC: the task waits for room and resumes
    from its last checkpoint; an uncaught OSError would have ended it as a computation error."""
    code, _app_, _vm = run_wrapper(tmp_path, "echo hi > out", backend=FullDiskBackend)
    slot = tmp_path / "slot"
    later = read_temporary_exit(slot)
    assert code == 0 and later is not None
    assert later.reason.startswith("the slot's disk is full"), later.reason
    assert "no space left on device" in later.reason.lower() and later.delay == 600
    assert read_finish_file(slot) is None
    _no_traceback(caplog)


TRIGGER_RUNS = [
    # id, guest script, which trigger file, the finish status / temporary-exit delay, note
    ("completion-inf", "echo ok > out; echo inf > done; sleep 5", "completion", 0, "taken as 0"),
    ("completion-overflow", "echo ok > out; echo 1e999 > done; sleep 5", "completion", 0, "taken as 0"),
    ("completion-huge", "echo ok > out; echo 1e300 > done; sleep 5", "completion", 1, "taken as 1"),
    ("temporary-exit-inf", "echo inf > later; sleep 5", "temporary", MAX_TEMPORARY_EXIT_DELAY, "86400"),
    (
        "temporary-exit-overflow",
        "echo 1e999 > later; sleep 5",
        "temporary",
        MAX_TEMPORARY_EXIT_DELAY,
        "86400",
    ),
    ("temporary-exit-nan", "echo nan > later; sleep 5", "temporary", 300.0, "using 300 s"),
    ("temporary-exit-negative", "echo -7 > later; sleep 5", "temporary", 0.0, "clamped to 0 s"),
]


@pytest.mark.parametrize(
    ("script", "which", "expected", "note"), [pytest.param(*c[1:], id=c[0]) for c in TRIGGER_RUNS]
)
def test_trigger_files_with_hostile_numbers_never_lose_the_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, script: str, which: str, expected: float, note: str
) -> None:
    code, _app_, _vm = run_wrapper(
        tmp_path, script, completion_trigger_file="done", temporary_exit_trigger_file="later"
    )
    slot = tmp_path / "slot"
    if which == "completion":
        finish = read_finish_file(slot)
        assert finish is not None, caplog.text
        assert finish.status == (0 if expected == 0 else int(ExitCode.CHILD_FAILED))
        assert code == finish.status
        if expected == 0:
            assert (slot / "out").read_bytes() == b"ok\n"
    else:
        assert code == 0
        later = read_temporary_exit(slot)
        assert later is not None, caplog.text
        assert later.delay == expected
        assert not (slot / FINISH_FILE).exists()
    assert note in caplog.text
    _no_traceback(caplog)


def test_a_1e300_credit_report_is_clamped_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    init = InitData(project_dir=str(tmp_path / "project"), rsc_fpops_bound=1e13)
    code, app, _vm = run_wrapper(
        tmp_path, "echo 1e300 > credit; sleep 4.5; echo ok > out", init=init, credit_report_filename="credit"
    )
    assert code == 0
    assert app.last_status.fpops_cumulative == 1e13
    clamped = [r for r in caplog.records if "more than the host could have done" in r.getMessage()]
    assert len(clamped) == 1, caplog.text
    _no_traceback(caplog)


def test_a_claim_above_the_hosts_speed_is_clamped_to_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # host_cpu_time() of the stand-in is 1 s: at most 1e9 * 1 * 16 operations.
    init = InitData(
        project_dir=str(tmp_path / "project"), rsc_fpops_bound=1e18, host_info=HostInfo(p_fpops=1e9)
    )
    code, app, _vm = run_wrapper(
        tmp_path, "echo 5e15 > credit; sleep 2.5; echo ok > out", init=init, credit_report_filename="credit"
    )
    assert code == 0
    assert app.last_status.fpops_cumulative == 16e9
    assert "clamped to 1.6e+10" in caplog.text


@pytest.mark.parametrize(
    ("content", "fraction"),
    [
        pytest.param(b"inf", None, id="inf"),
        pytest.param(b"nan", None, id="nan"),
        pytest.param(b"7", 1.0, id="seven"),
        pytest.param(b"-3", 0.0, id="negative"),
    ],
)
def test_a_hostile_fraction_done_is_clamped_or_ignored(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    content: bytes,
    fraction: float | None,
) -> None:
    reported: list[float | None] = []
    original = BoincApp.report

    def recording(self: BoincApp, fraction_done: float | None = None, **kw: Any) -> None:
        reported.append(fraction_done)
        original(self, fraction_done, **kw)

    monkeypatch.setattr(BoincApp, "report", recording)
    (tmp_path / "fd").write_bytes(content)
    code, _app_, _vm = run_wrapper(
        tmp_path,
        f"cp {tmp_path / 'fd'} fraction; sleep 0.5; echo ok > out",
        fraction_done_filename="fraction",
    )
    assert code == 0
    # Every report while the program ran carried the clamped value or none; the last is the end's 1.0.
    assert reported[-1] == 1.0
    assert set(reported[:-1]) <= {fraction, None} and fraction in reported[:-1], reported
    assert "fraction done file fraction:" in caplog.text
    _no_traceback(caplog)


CONTRACT_SPECIALS = [
    ("fraction-fifo", "fraction_done_filename", "fraction", "mkfifo fraction"),
    ("credit-fifo", "credit_report_filename", "credit", "mkfifo credit"),
    ("completion-fifo", "completion_trigger_file", "done", "mkfifo done"),
    ("temporary-exit-fifo", "temporary_exit_trigger_file", "later", "mkfifo later"),
    ("fraction-dev-zero", "fraction_done_filename", "fraction", "ln -s /dev/zero fraction"),
    ("credit-directory", "credit_report_filename", "credit", "mkdir credit"),
]


@pytest.mark.parametrize(
    ("field", "name", "make"), [pytest.param(*c[1:], id=c[0]) for c in CONTRACT_SPECIALS]
)
def test_contract_files_that_are_not_regular_files_are_ignored_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, name: str, make: str
) -> None:
    task: dict[str, Any] = {field: name}
    code, _app_, _vm = run_wrapper(tmp_path, f"{make}; sleep 2.5; echo ok > out", **task)
    assert code == 0, caplog.text
    assert f"{name} is" in caplog.text and "; ignored" in caplog.text
    warned = [r for r in caplog.records if f"{name} is" in r.getMessage()]
    assert len(warned) == 1, "the reason is logged once, not at every poll"
    _no_traceback(caplog)


def test_enormous_contract_files_are_read_with_a_bound(tmp_path: Path) -> None:
    code, _app_, vm = run_wrapper(
        tmp_path,
        "head -c 20000000 /dev/zero | tr '\\0' 9 > credit; cp credit fraction; sleep 2.5; echo ok > out",
        credit_report_filename="credit",
        fraction_done_filename="fraction",
    )
    assert code == 0
    assert vm.reads and all(n <= 4096 for _, n in vm.reads)


# --------------------------------------------------------------------------------------
# 3. The entry point on a hostile slot: init_data.xml and the client's command line

BAD_INIT_DATA: list[tuple[str, bytes, str]] = [
    ("unknown-encoding", b'<?xml version="1.0" encoding="x-bogus"?><app_init_data/>', "declares an encoding"),
    ("utf-16-declared", b'<?xml version="1.0" encoding="utf-16"?><app_init_data/>', "init_data.xml"),
    ("dtd", b"<!DOCTYPE app_init_data [<!ELEMENT a ANY>]><app_init_data/>", "declares a DTD"),
    (
        "entity-bomb",
        b'<!DOCTYPE a [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><app_init_data>&b;</app_init_data>',
        "declares a DTD",
    ),
    ("malformed", b"<app_init_data><slot>1</app_init_data>", "not well-formed"),
    ("wrong-root", b"<app_version/>", "root <app_version>"),
    ("not-utf8", b"<app_init_data><wu_name>\xff\xfe</wu_name></app_init_data>", "not well-formed"),
    ("nan", b"<app_init_data><checkpoint_period>nan</checkpoint_period></app_init_data>", "NaN"),
    ("overflow", b"<app_init_data><wu_cpu_time>1e999</wu_cpu_time></app_init_data>", "infinite"),
    ("host-inf", b"<app_init_data><host_info><p_fpops>inf</p_fpops></host_info></app_init_data>", "infinite"),
    ("bad-int", b"<app_init_data><slot>9" + b"9" * 5000 + b"</slot></app_init_data>", "integer"),
]


def _run_entry(slot: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> int:
    monkeypatch.chdir(slot)
    monkeypatch.setattr("signal.signal", lambda *_: None)  # leave pytest's SIGTERM alone
    return wrapper_main(argv)


@pytest.mark.parametrize(("doc", "words"), [pytest.param(*c[1:], id=c[0]) for c in BAD_INIT_DATA])
def test_hostile_init_data_is_an_init_failure_with_reason_and_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, doc: bytes, words: str
) -> None:
    (tmp_path / "init_data.xml").write_bytes(doc)
    code = _run_entry(tmp_path, monkeypatch, [])
    assert code == int(ExitCode.INIT_FAILURE) == 206
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, caplog.text
    assert words in errors[0] and "(hint: " in errors[0], errors[0]
    finish = read_finish_file(tmp_path)
    assert finish is not None and finish.status == 206
    _no_traceback(caplog)


def test_init_data_that_is_a_fifo_is_refused_without_blocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(tmp_path / "init_data.xml")
    t0 = time.monotonic()
    code = _run_entry(tmp_path, monkeypatch, [])
    assert time.monotonic() - t0 < 10
    assert code == 206
    assert "FIFO" in caplog.text and "hint: " in caplog.text
    _no_traceback(caplog)


def _standalone_slot(slot: Path) -> None:
    """A slot without init_data.xml (the wrapper runs standalone) holding a complete job."""
    job = VmJob(vm_kernel="kernel", task=Task(application="/bin/true"), output_files=())
    (slot / "vm_job.xml").write_text(render_job(job), encoding="utf-8")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        pytest.param(["--nthreads", "inf"], "--nthreads 'inf' is infinite", id="nthreads-inf"),
        pytest.param(["--nthreads", "1e999"], "--nthreads '1e999' is infinite", id="nthreads-overflow"),
        pytest.param(["--nthreads", "nan"], "NaN", id="nthreads-nan"),
        pytest.param(["--nthreads", "four"], "is not a number", id="nthreads-word"),
        pytest.param(["--memory_size_mb", "-1"], "must be at least 1", id="memory-negative"),
        pytest.param(["--memory_size_mb", "1e300"], "above the limit", id="memory-huge"),
    ],
)
def test_hostile_client_options_are_an_init_failure(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    argv: list[str],
    words: str,
) -> None:
    _standalone_slot(tmp_path)
    code = _run_entry(tmp_path, monkeypatch, argv)
    assert code == 206, caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and words in errors[0] and "(hint: " in errors[0], caplog.text
    _no_traceback(caplog)


def test_the_wrapper_command_writes_no_traceback_for_a_hostile_slot(tmp_path: Path) -> None:
    """The same through the console script as the client starts it: only stderr.txt's lines."""
    (tmp_path / "init_data.xml").write_bytes(b'<?xml version="1.0" encoding="x-bogus"?><app_init_data/>')
    proc = subprocess.run(
        [sys.executable, "-m", "boincvm", "wrapper"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 206
    assert "Traceback" not in proc.stderr
    assert "declares an encoding boincvm cannot read" in proc.stderr and "hint: " in proc.stderr


# --------------------------------------------------------------------------------------
# 4. End to end through run-local with a real QEMU guest (slow under TCG: run by name, -k)


def _e2e_wu(tmp_path: Path, script: str) -> Path:
    from boincvm.workunit.make import WorkunitRequest, make_workunits
    from boincvm.workunit.templates import Resources

    task = Task(
        application="/bin/sh",
        fraction_done_filename="fraction_done",
        credit_report_filename="credit_report",
        completion_trigger_file="done",
        temporary_exit_trigger_file="later",
    )
    job = VmJob(task=task, output_files=(OutputFile("out", 100_000),), minimum_checkpoint_interval=0)
    wu = tmp_path / "wu"
    make_workunits(
        WorkunitRequest(
            app_name="itest",
            job=job,
            output_dir=wu,
            command_line=f"-c {script!r}",
            resources=Resources(rsc_memory_bound=1e9, rsc_fpops_bound=86400e9),
        )
    )
    return wu


@pytest.mark.integration
def test_e2e_inf_in_both_triggers(app_version: Path, data_dir: Path, tmp_path: Path) -> None:
    """``inf`` as the temporary-exit delay (clamped to a day; run-local restarts at once) and
    then as the completion code (taken as 0): two starts, a success, both reasons logged."""
    script = "echo ok > out; sleep 1; echo inf > later; sleep 4; echo inf > done; sleep 30"
    summary = run(_e2e_wu(tmp_path, script), app_version, data_dir, tmp_path)
    assert summary.outcome == "success", summary.message + summary.stderr_tail
    assert summary.starts == 2, summary.events
    assert "clamped to 86400 s" in summary.stderr_tail
    assert "exit code 'inf' is not a number; taken as 0" in summary.stderr_tail
    assert "Traceback" not in summary.stderr_tail
    assert (tmp_path / "results/out").read_text() == "ok\n"


@pytest.mark.integration
def test_e2e_a_1e300_credit_report_is_clamped(app_version: Path, data_dir: Path, tmp_path: Path) -> None:
    script = "echo 1e300 > credit_report; echo 0.5 > fraction_done; sleep 5; echo ok > out"
    summary = run(_e2e_wu(tmp_path, script), app_version, data_dir, tmp_path)
    assert summary.outcome == "success", summary.message + summary.stderr_tail
    assert summary.ops == 86400e9  # the workunit's rsc_fpops_bound: run-local's host has no p_fpops
    assert summary.credit_claimed == pytest.approx(200.0)
    assert "more than the host could have done" in summary.stderr_tail


@pytest.mark.integration
def test_e2e_a_fifo_output_is_refused_once(app_version: Path, data_dir: Path, tmp_path: Path) -> None:
    summary = run(_e2e_wu(tmp_path, "mkfifo out"), app_version, data_dir, tmp_path)
    assert summary.outcome == "compute_error", summary.message + summary.stderr_tail
    assert summary.starts == 1, summary.events
    assert "is a FIFO (named pipe), not a regular file" in summary.message
    assert "VM problem" not in summary.stderr_tail
    assert not (tmp_path / "results/out").exists()
