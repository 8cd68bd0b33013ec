"""run-local: play the BOINC client for one workunit on this machine.

It lays out a client data directory (project and slot), starts the app version's main
program (the wrapper) as a separate process, exactly as the client would, and talks to it
only through the slot: ``init_data.xml``, the shared-memory file, the finish and
temporary-exit files. It restarts the wrapper after a quit, a temporary exit or a crash
(as the client does), can inject faults at chosen moments, and at the end checks the
outputs against the output template and copies them to a results directory.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from boincvm.boinc.client import ClientOptions, LocalClient, Outcome, OutcomeKind
from boincvm.boinc.slot import LocalTask, clean_slot
from boincvm.runlocal.faults import FaultKind, describe_interval
from boincvm.runlocal.request import (
    CREDIT_PER_FLOP,
    LiveState,
    RunLocalRequest,
    RunSummary,
)
from boincvm.runlocal.task import build_task, checkpoint_interval
from boincvm.wrapper.status import STATUS_FILE, StatusReport


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
    live.checkpoint_interval, live.checkpoint_interval_source = checkpoint_interval(req)
    every = describe_interval(live.checkpoint_interval)
    live.events.append(f"   0.0s  checkpoints {every}: {live.checkpoint_interval_source}")
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
        for old in client.project_dir.glob(f"trickle_up_{task.result_name}_*.xml"):
            old.unlink(missing_ok=True)
        client.start()
        live.starts = 1
        deadline = t0 + req.timeout
        while True:
            now = time.monotonic()
            result = client.poll()
            status = StatusReport.read(client.slot_dir)
            if status is not None:
                live.phase = status.phase
                live.fraction_done = status.fraction_done
                live.checkpoints = max(live.checkpoints, status.checkpoints)
                live.last_output = status.last_output or live.last_output
                live.accel = status.accel or live.accel
                run_timings = dict(status.timings)
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
        trickles = _trickles(client.project_dir, task.result_name)
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
        trickles=trickles,
        checkpoint_interval=live.checkpoint_interval,
        checkpoint_interval_source=live.checkpoint_interval_source,
        faults_missed=[
            f.why_missed(live, live.elapsed, live.checkpoint_interval, live.checkpoint_interval_source)
            for _, f in pending
        ],
    )


def _trickles(project_dir: Path, result_name: str) -> list[dict[str, str]]:
    """The trickle-up messages the emulated client took from the slot, oldest first, taken
    away (a real client sends them with its next scheduler request)."""
    found: list[tuple[int, str, Path]] = []
    for path in project_dir.glob(f"trickle_up_{result_name}_*.xml"):
        stamp = path.stem.rsplit("_", 1)[-1]
        found.append((int(stamp) if stamp.isdigit() else 0, path.name, path))
    out = []
    for _, _, path in sorted(found):
        text = path.read_text(encoding="utf-8", errors="replace")
        path.unlink(missing_ok=True)
        head, sep, body = text.partition("\n")
        variety = head.removeprefix("<variety>").removesuffix("</variety>") if sep else ""
        out.append({"variety": variety, "text": body})
    return out


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
