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
from collections.abc import Callable, Mapping
from pathlib import Path

from boincvm.boinc.client import ClientOptions, LocalClient
from boincvm.boinc.outcome import Outcome, OutcomeKind
from boincvm.boinc.slot import LocalTask, clean_slot
from boincvm.runlocal.faults import Fault, FaultKind, describe_interval
from boincvm.runlocal.request import (
    CREDIT_PER_FLOP,
    LiveState,
    RunLocalRequest,
    RunSummary,
)
from boincvm.runlocal.task import build_task, checkpoint_interval
from boincvm.wrapper.status import STATUS_FILE, Phase, StatusReport

#: The phases near the end: the wrapper is about to exit, so its result is watched for closely.
CLOSING = frozenset({Phase.COPY_OUT, Phase.CLEANUP, Phase.DONE})
#: Seconds an abort after the run-local timeout is given before the run is given up on.
ABORT_GRACE = 120.0


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
    session = _Session(req, on_update)
    with LocalClient(req.data_dir, task, slot=slot, options=_client_options(req)) as client:
        _forget_earlier_run(client, task)
        outcome = session.drive(client)
        outputs = _collect(outcome, task, req.results_dir)
        trickles = _trickles(client.project_dir, task.result_name)
        if not req.keep_slot:
            clean_slot(client.slot_dir)
            client.slot_dir.rmdir()
            for o in task.output_files:
                (client.project_dir / o.name).unlink(missing_ok=True)
    return session.summary(task, outcome, outputs, trickles)


def _client_options(req: RunLocalRequest) -> ClientOptions:
    heartbeat_fault = any(f.kind is FaultKind.HEARTBEAT_LOSS for f in req.faults)
    return ClientOptions(
        checkpoint_period=req.checkpoint_period,
        clean_slot=False,
        # With a client pid the app watches the pid; without one it watches heartbeats.
        client_pid=0 if heartbeat_fault else None,
    )


def _forget_earlier_run(client: LocalClient, task: LocalTask) -> None:
    """Remove the results and trickles an earlier run of the same workunit left in the project."""
    for o in task.output_files:
        (client.project_dir / o.name).unlink(missing_ok=True)
    for old in client.project_dir.glob(f"trickle_up_{task.result_name}_*.xml"):
        old.unlink(missing_ok=True)


class _Session:
    """One run-local run: polls the client, follows the wrapper's status, restarts the wrapper
    as the client would, injects the faults when their points come, and keeps the live state."""

    def __init__(self, req: RunLocalRequest, on_update: Callable[[LiveState], None] | None) -> None:
        self.req = req
        self.on_update = on_update
        self.live = live = LiveState()
        live.checkpoint_interval, live.checkpoint_interval_source = checkpoint_interval(req)
        every = describe_interval(live.checkpoint_interval)
        live.events.append(f"   0.0s  checkpoints {every}: {live.checkpoint_interval_source}")
        self.pending = list(enumerate(req.faults))
        self.reached_at: dict[int, float] = {}  # when each pending fault's point was reached
        self.timings: dict[str, float] = {}  # seconds per phase, over the wrapper's starts
        self.run_timings: dict[str, float] = {}  # the current start's
        self.t0 = time.monotonic()
        self.deadline = self.t0 + req.timeout
        self.suspended_until: float | None = None

    def event(self, text: str, at: float | None = None) -> None:
        elapsed = self.live.elapsed if at is None else at - self.t0
        self.live.events.append(f"{elapsed:6.1f}s  {text}")

    # -- the loop ---------------------------------------------------------------------
    def drive(self, client: LocalClient) -> Outcome:
        """Start the wrapper and poll until a final outcome (restarts included)."""
        client.start()
        self.live.starts = 1
        self.live.history.new_start()
        while True:
            now = time.monotonic()
            result = client.poll()
            self._follow(client, now)
            if result is not None:
                if self._restart(client, result, now):
                    continue
                self._show()  # the last status: the program's final output, the last phase
                return result
            self._inject_due(client, now)
            self._resume_due(client, now)
            self._enforce_timeout(client, now)
            self._show()
            time.sleep(self._poll_delay())

    def _show(self) -> None:
        if self.on_update is not None:
            self.on_update(self.live)

    def _follow(self, client: LocalClient, now: float) -> None:
        """Read the wrapper's status file and the client's status into the live state."""
        live = self.live
        status = StatusReport.read(client.slot_dir)
        if status is not None:
            live.history.observe(status.phase, status.checkpoints, status.steps)
            live.phase = str(live.history.current or status.phase)
            live.fraction_done = status.fraction_done
            live.checkpoints = max(live.checkpoints, status.checkpoints)
            live.last_output = status.last_output or live.last_output
            live.accel = status.accel or live.accel
            self.run_timings = dict(status.timings)
        cs = client.status
        live.cpu_time = cs.current_cpu_time
        live.wrapper_pid = cs.pid
        live.elapsed = now - self.t0

    def _restart(self, client: LocalClient, result: Outcome, now: float) -> bool:
        """Count the ended start; start the wrapper again if the client would (True)."""
        for k, v in self.run_timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v
        self.run_timings = {}
        self.event(f"wrapper exited: {result.message}")
        if not (result.will_restart and client.status.starts < self.req.max_starts and now < self.deadline):
            return False
        if result.temporary_exit is not None:
            time.sleep(min(result.temporary_exit.delay, 5.0))
        client.heartbeats_enabled = True
        (client.slot_dir / STATUS_FILE).unlink(missing_ok=True)
        client.start()
        self.live.starts = client.status.starts
        self.live.history.new_start()
        self.event(f"restarted the wrapper (start {self.live.starts})", at=time.monotonic())
        return True

    def _poll_delay(self) -> float:
        # Watch closely while a fault waits for a short phase (a checkpoint lasts ~0.3 s),
        # and near the end (the wrapper is about to exit): the result is there sooner.
        closing = self.live.history.current in CLOSING
        watching = any(f.point_reached(self.live) is not None for _, f in self.pending)
        return 0.05 if closing or watching else 0.25

    # -- faults -----------------------------------------------------------------------
    def _inject_due(self, client: LocalClient, now: float) -> None:
        """Inject the first pending fault whose point (plus its seconds) has come; one per poll."""
        live = self.live
        for i, fault in list(self.pending):
            if not self._due(i, fault, now):
                continue
            self.pending.remove((i, fault))
            self.reached_at.clear()
            self.event(
                f"injected {fault.kind.value} at {fault.describe()}"
                f" (phase {live.phase}, {live.fraction_done:.0%} done, {live.checkpoints} checkpoints)"
            )
            _INJECT[fault.kind](client)
            if fault.lasts is not None:
                self.suspended_until = now + fault.lasts
            return

    def _due(self, i: int, fault: Fault, now: float) -> bool:
        reached = fault.point_reached(self.live)
        if reached is None:  # the point is the start
            return now - self.t0 >= fault.seconds
        if reached and i not in self.reached_at:
            self.reached_at[i] = now
        return i in self.reached_at and now - self.reached_at[i] >= fault.seconds

    def _resume_due(self, client: LocalClient, now: float) -> None:
        if self.suspended_until is not None and now >= self.suspended_until:
            client.resume()
            self.suspended_until = None
            self.event("resumed")

    def _enforce_timeout(self, client: LocalClient, now: float) -> None:
        if now > self.deadline:
            client.abort()
            self.event(f"timed out after {self.req.timeout:g} s: aborting")
            self.deadline = now + ABORT_GRACE

    # -- the end ----------------------------------------------------------------------
    def summary(
        self,
        task: LocalTask,
        outcome: Outcome,
        outputs: list[dict[str, object]],
        trickles: list[dict[str, str]],
    ) -> RunSummary:
        """What the run came to."""
        live, cs = self.live, outcome.status
        ops = cs.fpops_cumulative
        return RunSummary(
            workunit=task.wu_name,
            outcome=outcome.kind.value,
            ok=outcome.ok,
            exit_code=outcome.finish.status if outcome.finish is not None else outcome.exit_code,
            message=_message(outcome, outputs),
            elapsed=time.monotonic() - self.t0,
            cpu_time=cs.current_cpu_time,
            credit_claimed=(ops if ops else cs.current_cpu_time * 1e9) * CREDIT_PER_FLOP,
            ops=ops,
            checkpoints=live.checkpoints,
            starts=cs.starts,
            timings=self.timings,
            outputs=outputs,
            results_dir=str(self.req.results_dir),
            events=live.events,
            stderr_tail=outcome.stderr_tail[-4000:],
            trickles=trickles,
            checkpoint_interval=live.checkpoint_interval,
            checkpoint_interval_source=live.checkpoint_interval_source,
            faults_missed=[
                f.why_missed(live, live.elapsed, live.checkpoint_interval, live.checkpoint_interval_source)
                for _, f in self.pending
            ],
            phases=live.history.per_start(),
        )


def _stop_heartbeats(client: LocalClient) -> None:
    client.heartbeats_enabled = False


#: What each kind of fault does to the client (a suspend is undone after :attr:`Fault.lasts`).
_INJECT: Mapping[FaultKind, Callable[[LocalClient], None]] = {
    FaultKind.SUSPEND: LocalClient.suspend,
    FaultKind.QUIT: LocalClient.quit,
    FaultKind.KILL: LocalClient.kill,
    FaultKind.ABORT: LocalClient.abort,
    FaultKind.HEARTBEAT_LOSS: _stop_heartbeats,
}


def _message(outcome: Outcome, outputs: list[dict[str, object]]) -> str:
    """The client's words for the outcome, with the wrapper's reason and a bad output's error."""
    message = outcome.message
    if outcome.finish is not None and outcome.finish.message:
        message = f"{message}: {outcome.finish.message}"
    bad = [o for o in outputs if o.get("error")]
    if bad and outcome.kind is OutcomeKind.SUCCESS:
        message = f"{message}; {bad[0]['error']}"
    return message


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
