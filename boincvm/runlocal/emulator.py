"""run-local: play the BOINC client for one workunit on this machine.

It lays out a client data directory (project and slot), starts the app version's main
program (the wrapper) as a separate process, exactly as the client would, and talks to it
only through the slot: ``init_data.xml``, the shared-memory file, the finish and
temporary-exit files. It restarts the wrapper after a quit, a temporary exit or a crash
(as the client does), can inject faults at chosen moments, and at the end checks the
outputs against the output template and copies them to a results directory.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from boincvm.appversion.model import parse_version_xml
from boincvm.boinc.client import ClientOptions, LocalClient, Outcome, OutcomeKind
from boincvm.boinc.slot import LocalTask, OutputFile, TaskFile, clean_slot
from boincvm.errors import InputError
from boincvm.findings import errors_in
from boincvm.validate import check_output_template
from boincvm.workunit.make import open_workunit_dir
from boincvm.xmlio import parse_xml, read_bytes, text_of

STATUS_FILE = "boincvm_status.json"
#: Cobblestones: 200 credits per day of a 1 GFLOPS computer.
CREDIT_PER_FLOP = 200.0 / 86400e9


class FaultKind(enum.StrEnum):
    """What run-local can do to the wrapper."""

    SUSPEND = "suspend"
    QUIT = "quit"
    KILL = "kill"
    ABORT = "abort"
    HEARTBEAT_LOSS = "heartbeat-loss"


PHASES = ("boot", "restore", "install", "run", "checkpoint", "copy-out", "cleanup")

#: ``WHEN``: a point (seconds, a phase, a progress point or a checkpoint count), then
#: ``+SECONDS`` after it, then (suspend only) ``:SECONDS`` of suspension.
_WHEN = re.compile(
    r"(?:(?P<point>progress|checkpoint):(?P<value>[0-9.]+)|(?P<phase>[a-z-]+))?"
    r"(?:\+?(?P<seconds>[0-9.]+))?(?::(?P<duration>[0-9.]+))?"
)


@dataclass(frozen=True)
class Fault:
    """One injected fault, at a point of the run plus ``seconds``.

    The point is the start (no phase, progress or checkpoint count), the moment the wrapper
    reports ``phase``, the first status report with ``progress`` or more done, or the moment
    ``checkpoints`` checkpoints have been committed. Progress and checkpoint points land
    mid-run on any host, however fast the guest computes. ``duration`` is how long a suspend
    lasts.
    """

    kind: FaultKind
    seconds: float = 0.0
    phase: str | None = None
    duration: float = 10.0
    progress: float | None = None
    checkpoints: int | None = None

    @classmethod
    def parse(cls, kind: FaultKind, spec: str) -> Fault:
        """Parse a ``WHEN``: ``SECONDS`` after the start, a ``PHASE``, ``progress:FRACTION``
        (the first status report at or above that fraction done) or ``checkpoint:N`` (once N
        checkpoints are committed), each optionally followed by ``+SECONDS``; a suspend may
        end in ``:SECONDS``, how long it lasts.

        Raises:
            InputError: not of that form, an unknown phase, a fraction outside (0, 1] or a
                checkpoint count below 1.
        """
        option = f"--{kind.value}-at {spec!r}"
        hint = "WHEN is for example 30, run+5, progress:0.5 or checkpoint:2 (see run-local --help)"
        m = _WHEN.fullmatch(spec.strip())
        if not m or not (m.group("point") or m.group("phase") or m.group("seconds")):
            raise InputError(f"{option}: not a WHEN", hint=hint)
        try:
            duration = float(m.group("duration")) if m.group("duration") else 10.0
            seconds = float(m.group("seconds") or 0)
            value = float(m.group("value")) if m.group("value") else None
        except ValueError:
            raise InputError(f"{option}: not a number", hint=hint) from None
        phase = m.group("phase")
        if phase and phase not in PHASES:
            raise InputError(f"{option}: unknown phase {phase!r}", hint=f"phases: {', '.join(PHASES)}")
        progress = checkpoints = None
        if m.group("point") == "progress":
            assert value is not None
            if not 0 < value <= 1:
                raise InputError(f"{option}: the fraction must be above 0 and at most 1", hint=hint)
            progress = value
        elif m.group("point") == "checkpoint":
            assert value is not None
            if value < 1 or value != int(value):
                raise InputError(f"{option}: the checkpoint count must be a whole number from 1", hint=hint)
            checkpoints = int(value)
        return cls(kind, seconds, phase, duration, progress, checkpoints)

    def point_reached(self, live: LiveState) -> bool | None:
        """Whether the run has reached this fault's point; None when the point is the start."""
        if self.phase is not None:
            return live.phase == self.phase
        if self.progress is not None:
            return live.fraction_done >= self.progress
        if self.checkpoints is not None:
            return live.checkpoints >= self.checkpoints
        return None

    def describe(self) -> str:
        """The point in words, for the event log."""
        if self.progress is not None:
            return f"progress {self.progress:g}"
        if self.checkpoints is not None:
            return f"checkpoint {self.checkpoints}"
        return f"phase {self.phase}" if self.phase else f"{self.seconds:g} s"


@dataclass(frozen=True)
class RunLocalRequest:
    """What run-local was asked to do."""

    workunit_dir: Path
    app_version_dir: Path
    results_dir: Path
    data_dir: Path
    workunit: str | None = None
    faults: tuple[Fault, ...] = ()
    timeout: float = 3600.0
    checkpoint_period: float = 60.0
    max_starts: int = 20
    keep_slot: bool = False


@dataclass
class LiveState:
    """What the live view shows; updated about once a second."""

    phase: str = "starting"
    fraction_done: float = 0.0
    cpu_time: float = 0.0
    checkpoints: int = 0
    starts: int = 0
    elapsed: float = 0.0
    last_output: str = ""
    accel: str = ""
    wrapper_pid: int | None = None
    events: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunSummary:
    """The end of a run-local."""

    workunit: str
    outcome: str
    ok: bool
    exit_code: int | None
    message: str
    elapsed: float
    cpu_time: float
    credit_claimed: float
    ops: float | None
    checkpoints: int
    starts: int
    timings: dict[str, float]
    outputs: list[dict[str, object]]
    results_dir: str
    events: list[str]
    stderr_tail: str

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return dict(self.__dict__)


def build_task(req: RunLocalRequest) -> LocalTask:
    """The LocalTask for the workunit and app version directories.

    Raises:
        InputError: either directory is unusable.
    """
    wud = open_workunit_dir(req.workunit_dir)
    record = wud.record(req.workunit)
    av = req.app_version_dir
    vx, findings = parse_version_xml(read_bytes(av / "version.xml", what="version.xml"))
    if findings:
        raise InputError(f"{av}/version.xml: {findings[0]}")
    app_files = []
    for f in vx.files:
        src = av / f.physical_name
        if not src.is_file():
            raise InputError(f"app version file {src} is missing")
        app_files.append(
            TaskFile(
                src, f.physical_name, f.logical_name, main_program=f.main_program, executable=f.main_program
            )
        )
    if not any(f.main_program for f in app_files):
        raise InputError(f"{av}/version.xml names no main program")
    inputs = tuple(
        TaskFile(wud.download / f.physical_name, f.physical_name, f.open_name) for f in record.files
    )
    for t in inputs:
        if not t.source.is_file():
            raise InputError(
                f"workunit file {t.source} is missing", hint="run boincvm validate on the workunit"
            )
    tpl_findings, sizes = check_output_template(
        read_bytes(wud.output_template, what="output template"), wud.output_template.name
    )
    errors = errors_in(tpl_findings)
    if errors:
        raise InputError(f"{wud.output_template.name}: {errors[0]}")
    optional = optional_outputs(read_bytes(wud.output_template, what="output template"))
    result = f"{record.name}_0"
    outputs = tuple(
        OutputFile(f"{result}_r0_{i}", open_name, optional=open_name in optional, max_nbytes=int(size or 0))
        for i, (open_name, size) in enumerate(sizes.items())
    )
    wu_tpl = parse_xml(read_bytes(wud.input_template, what="input template"), what="input template")
    res = {c.tag: text_of(c) for c in (wu_tpl.find("workunit") or [])}

    def num(tag: str, default: float) -> float:
        try:
            return float(res.get(tag, default))
        except ValueError:
            return default

    return LocalTask(
        app_name=wud.app_name,
        wu_name=record.name,
        result_name=result,
        app_files=tuple(app_files),
        input_files=inputs,
        output_files=outputs,
        command_line=_quote_for_client(record.command_line),
        rsc_fpops_est=num("rsc_fpops_est", 1e12),
        rsc_fpops_bound=num("rsc_fpops_bound", 1e13),
        rsc_memory_bound=num("rsc_memory_bound", 5e8),
        rsc_disk_bound=num("rsc_disk_bound", 1e9),
        delay_bound=num("delay_bound", 7 * 86400),
    )


def _quote_for_client(cmd: str) -> str:
    # create_work stores the line as given; the client splits it itself.
    return cmd


def optional_outputs(data: bytes) -> set[str]:
    """The open names an output template marks ``<optional/>``."""
    root = parse_xml(data, what="output template")
    result = root.find("result")
    names: set[str] = set()
    for ref in result.findall("file_ref") if result is not None else []:
        on = ref.find("open_name")
        if on is not None and ref.find("optional") is not None:
            names.add(text_of(on))
    return names


def _free_slot(data_dir: Path) -> int:
    """The first slot number whose directory is absent or empty."""
    slots = data_dir / "slots"
    n = 0
    while (slots / str(n)).exists() and any((slots / str(n)).iterdir()):
        n += 1
    return n


def default_data_dir() -> Path:
    """The emulated client's data directory: ``$XDG_CACHE_HOME/boincvm/client``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "boincvm" / "client"


def _read_status(slot: Path) -> dict[str, object] | None:
    try:
        data = json.loads((slot / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_local(req: RunLocalRequest, on_update: Callable[[LiveState], None] | None = None) -> RunSummary:
    """Run the workunit to a final outcome, injecting the requested faults.

    Raises:
        InputError: the workunit or app version cannot be used.
        ClientError, CommandNotFound: the wrapper cannot be started.
    """
    task = build_task(req)
    # The data directory persists like a real client's: project files stay where they are
    # (so the hypervisor's caches keyed on them stay valid); each run gets a free slot.
    slot = _free_slot(req.data_dir)
    heartbeat_fault = any(f.kind is FaultKind.HEARTBEAT_LOSS for f in req.faults)
    options = ClientOptions(
        checkpoint_period=req.checkpoint_period,
        clean_slot=False,
        # With a client pid the app watches the pid; without one it watches heartbeats.
        client_pid=0 if heartbeat_fault else None,
    )
    live = LiveState()
    pending = list(enumerate(req.faults))
    reached_at: dict[int, float] = {}  # when each pending fault's point was reached
    timings: dict[str, float] = {}
    run_timings: dict[str, float] = {}
    t0 = time.monotonic()
    suspended_until: float | None = None
    outcome: Outcome | None = None
    with LocalClient(req.data_dir, task, slot=slot, options=options) as client:
        for o in task.output_files:  # stale results of an earlier run of the same workunit
            (client.project_dir / o.name).unlink(missing_ok=True)
        client.start()
        live.starts = 1
        deadline = t0 + req.timeout
        while True:
            now = time.monotonic()
            result = client.poll()
            status = _read_status(client.slot_dir)
            if status is not None:
                live.phase = str(status.get("phase", live.phase))
                live.fraction_done = float(status.get("fraction_done", 0.0) or 0.0)  # type: ignore[arg-type]
                live.checkpoints = max(live.checkpoints, int(status.get("checkpoints", 0) or 0))  # type: ignore[call-overload]
                live.last_output = str(status.get("last_output", "") or live.last_output)
                live.accel = str(status.get("accel", "") or live.accel)
                got = status.get("timings")
                if isinstance(got, dict):
                    run_timings = {str(k): float(v) for k, v in got.items()}
            cs = client.status
            live.cpu_time = cs.current_cpu_time
            live.wrapper_pid = cs.pid
            live.elapsed = now - t0
            if result is not None:
                for k, v in run_timings.items():
                    timings[k] = timings.get(k, 0.0) + v
                run_timings = {}
                live.events.append(f"{live.elapsed:6.1f}s  wrapper exited: {result.message}")
                if result.will_restart and cs.starts < req.max_starts and now < deadline:
                    if result.temporary_exit is not None:
                        time.sleep(min(result.temporary_exit.delay, 5.0))
                    client.heartbeats_enabled = True
                    (client.slot_dir / STATUS_FILE).unlink(missing_ok=True)
                    client.start()
                    live.starts = client.status.starts
                    live.events.append(
                        f"{time.monotonic() - t0:6.1f}s  restarted the wrapper (start {live.starts})"
                    )
                    continue
                outcome = result
                break
            for i, fault in list(pending):
                reached = fault.point_reached(live)
                if reached is None:
                    if now - t0 < fault.seconds:
                        continue
                else:
                    if reached and i not in reached_at:
                        reached_at[i] = now
                    if i not in reached_at or now - reached_at[i] < fault.seconds:
                        continue
                pending.remove((i, fault))
                reached_at.clear()
                live.events.append(
                    f"{live.elapsed:6.1f}s  injected {fault.kind.value} at {fault.describe()}"
                    f" (phase {live.phase}, {live.fraction_done:.0%} done, {live.checkpoints} checkpoints)"
                )
                if fault.kind is FaultKind.SUSPEND:
                    client.suspend()
                    suspended_until = now + fault.duration
                elif fault.kind is FaultKind.QUIT:
                    client.quit()
                elif fault.kind is FaultKind.KILL:
                    client.kill()
                elif fault.kind is FaultKind.ABORT:
                    client.abort()
                else:
                    client.heartbeats_enabled = False
                break
            if suspended_until is not None and now >= suspended_until:
                client.resume()
                suspended_until = None
                live.events.append(f"{live.elapsed:6.1f}s  resumed")
            if now > deadline:
                client.abort()
                live.events.append(f"{live.elapsed:6.1f}s  timed out after {req.timeout:g} s: aborting")
                deadline = now + 120
            if on_update is not None:
                on_update(live)
            # Watch closely while a fault waits for a short phase (a checkpoint lasts ~0.3 s).
            # and near the end (the wrapper is about to exit): the result is there sooner.
            closing = live.phase in ("copy-out", "cleanup", "done")
            watching = any(f.point_reached(live) is not None for _, f in pending)
            time.sleep(0.05 if closing or watching else 0.25)
        slot_dir = client.slot_dir
        outputs = _collect(outcome, task, req.results_dir)
        if not req.keep_slot:
            clean_slot(slot_dir)
            slot_dir.rmdir()
            for o in task.output_files:
                (client.project_dir / o.name).unlink(missing_ok=True)
    cs = outcome.status
    ops = cs.fpops_cumulative
    credit = (ops if ops else cs.current_cpu_time * 1e9) * CREDIT_PER_FLOP
    exit_code = outcome.exit_code
    if outcome.finish is not None:
        exit_code = outcome.finish.status
    message = outcome.message
    if outcome.finish is not None and outcome.finish.message:
        message = f"{message}: {outcome.finish.message}"
    bad = [o for o in outputs if o.get("error")]
    if bad and outcome.kind is OutcomeKind.SUCCESS:
        message = f"{message}; {bad[0]['error']}"
    return RunSummary(
        workunit=task.wu_name,
        outcome=outcome.kind.value,
        ok=outcome.ok,
        exit_code=exit_code,
        message=message,
        elapsed=time.monotonic() - t0,
        cpu_time=cs.current_cpu_time,
        credit_claimed=credit,
        ops=ops,
        checkpoints=live.checkpoints,
        starts=cs.starts,
        timings=timings,
        outputs=outputs,
        results_dir=str(req.results_dir),
        events=live.events,
        stderr_tail=outcome.stderr_tail[-4000:],
    )


def _collect(outcome: Outcome, task: LocalTask, results_dir: Path) -> list[dict[str, object]]:
    results_dir.mkdir(parents=True, exist_ok=True)
    open_names = {o.name: o.open_name or o.name for o in task.output_files}
    out: list[dict[str, object]] = []
    for o in outcome.outputs:
        open_name = open_names.get(o.name, o.name)
        entry: dict[str, object] = {
            "name": open_name,
            "file": o.name,
            "size": o.size,
            "md5": o.md5,
            "error": o.error,
        }
        if o.size is not None and o.error is None:
            target = results_dir / open_name
            shutil.copyfile(o.path, target)
            entry["path"] = str(target)
        out.append(entry)
    (results_dir / "stderr.txt").write_text(outcome.stderr_tail, encoding="utf-8")
    return out
