"""A tiny BOINC app on :class:`boincvm.boinc.api.BoincApp`, started by the local client in tests.

It "works" for ``--seconds`` of unsuspended time, reports that as its CPU time, writes
events as JSON lines to ``--events`` and ends as ``--mode`` says.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from boincvm.boinc.api import AppOptions, BoincApp, slot_locked_exit
from boincvm.boinc.errors import SlotLocked


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--mode", choices=["finish", "temporary_exit", "error", "forever"], default="finish")
    p.add_argument("--heartbeat-timeout", type=float, default=30.0)
    p.add_argument("--client-check", type=float, default=10.0)
    p.add_argument("--lock-timeout", type=float, default=35.0)
    p.add_argument("--tick", type=float, default=0.05)
    args = p.parse_args(argv)

    def event(name: str, **data: object) -> None:
        with args.events.open("a") as f:
            f.write(json.dumps({"event": name, "t": time.monotonic(), **data}) + "\n")

    options = AppOptions(
        heartbeat_timeout=args.heartbeat_timeout,
        client_check_period=args.client_check,
        status_period=0.2,
        lock_timeout=args.lock_timeout,
    )
    try:
        app = BoincApp.start(options=options)
    except SlotLocked as err:
        event("slot_locked")
        return slot_locked_exit(Path.cwd(), err)
    d = app.init_data
    inp = app.resolve("in")
    event(
        "start",
        standalone=app.standalone,
        wu_cpu_time=d.wu_cpu_time,
        result=d.result_name,
        slot=d.slot,
        input=inp.read_text() if inp.exists() else None,
        checkpoint_period=d.checkpoint_period,
    )
    work = d.wu_cpu_time  # resume "from the checkpoint"
    beats = 0
    while True:
        got = app.tick()
        if got:
            event("control", requests=str(got), suspended=app.suspended)
        if app.last_heartbeat is not None and beats == 0:
            beats = 1
            event("heartbeat", wss=app.last_heartbeat.wss, max_wss=app.last_heartbeat.max_wss)
        if app.abort_requested:
            event("abort")
            return app.exit_abort()
        if app.quit_requested:
            event("quit")
            return app.exit_quit()
        if app.client_gone:
            event("client_gone")
            return app.exit_quit()
        if not app.suspended:
            work += args.tick
        run = work - d.wu_cpu_time
        app.report(min(work / args.seconds, 1.0), cpu_time=run, fpops_cumulative=work * 1e9)
        if app.time_to_checkpoint():
            app.checkpoint_completed(cpu_time=run)
            event("checkpoint", work=work)
        if work >= args.seconds and args.mode != "forever":
            if args.mode == "temporary_exit":
                event("temporary_exit")
                return app.temporary_exit(7, "waiting for the hypervisor", is_notice=True)
            app.resolve("out").write_text(f"done after {work:.2f}\n")
            event("finish")
            return app.finish(3 if args.mode == "error" else 0, "all good" if args.mode == "finish" else None)
        time.sleep(args.tick)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
