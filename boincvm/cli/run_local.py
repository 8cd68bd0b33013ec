"""``boincvm run-local``: run a workunit end to end here, playing the BOINC client."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import click

from boincvm.cli import console
from boincvm.cli.params import DIRECTORY, EXISTING_DIR, json_option

# The core is imported inside the command, not here: the group imports this module to list
# the command, and ``boincvm --help`` stays instant (start-up speed, not an import circle).


if TYPE_CHECKING:
    from rich.table import Table

    from boincvm.runlocal.faults import Fault, FaultKind
    from boincvm.runlocal.request import LiveState, RunLocalRequest, RunSummary


@click.command("run-local")
@click.argument("workunit_dir", type=EXISTING_DIR)
@click.option(
    "--app-version", type=EXISTING_DIR, required=True, help="App version directory (from package-image)."
)
@click.option("--workunit", "name", help="Which workunit of a batch (default: the first).")
@click.option(
    "--results",
    "results_dir",
    type=DIRECTORY,
    default=Path("results"),
    show_default=True,
    help="Where the outputs and summary go.",
)
@click.option(
    "--data-dir",
    type=DIRECTORY,
    help="The emulated client's data directory [default: ~/.cache/boincvm/client].",
)
@click.option(
    "--checkpoint-period",
    type=float,
    default=60.0,
    show_default=True,
    help="The client's checkpoint period preference (seconds).",
)
@click.option(
    "--timeout", type=float, default=3600.0, show_default=True, help="Abort after this many seconds."
)
@click.option(
    "--suspend-at",
    multiple=True,
    metavar="WHEN[:SECONDS]",
    help="Suspend at WHEN for SECONDS (default 10).",
)
@click.option(
    "--quit-at", multiple=True, metavar="WHEN", help="Ask the wrapper to quit (preemption), then restart it."
)
@click.option("--kill-at", multiple=True, metavar="WHEN", help="SIGKILL the wrapper, then restart it.")
@click.option("--abort-at", multiple=True, metavar="WHEN", help="Abort the task.")
@click.option("--heartbeat-loss-at", multiple=True, metavar="WHEN", help="Stop sending heartbeats.")
@click.option("--keep-slot", is_flag=True, help="Leave the slot directory as it is at the end.")
@click.option(
    "--client",
    type=click.Choice(["emulator", "boinc"]),
    default="emulator",
    show_default=True,
    help="boinc: run under the real BOINC client (boinc-client) against a loopback project on 127.0.0.1.",
)
@json_option("Print the summary as JSON on stdout.")
def command(
    workunit_dir: Path,
    app_version: Path,
    name: str | None,
    results_dir: Path,
    data_dir: Path | None,
    checkpoint_period: float,
    timeout: float,
    suspend_at: tuple[str, ...],
    quit_at: tuple[str, ...],
    kill_at: tuple[str, ...],
    abort_at: tuple[str, ...],
    heartbeat_loss_at: tuple[str, ...],
    keep_slot: bool,
    client: str,
    as_json: bool,
) -> None:
    """Run a workunit of WORKUNIT_DIR with an app version, as the BOINC client would.

    WHEN is seconds after the start (30), a wrapper phase (boot, restore, install, run,
    checkpoint, copy-out, cleanup), progress:FRACTION (the first status report at or above
    that fraction done: progress:0.3), or checkpoint:N (once N checkpoints are committed:
    checkpoint:2); each may be followed by +SECONDS (run+5, progress:0.5+2). Progress and
    checkpoint points land mid-run on any host, however fast its guest computes.
    --suspend-at appends :SECONDS of suspension (run+2:20, progress:0.3:5).
    """
    from boincvm.runlocal.faults import FaultKind

    faults = _faults(
        {
            FaultKind.SUSPEND: suspend_at,
            FaultKind.QUIT: quit_at,
            FaultKind.KILL: kill_at,
            FaultKind.ABORT: abort_at,
            FaultKind.HEARTBEAT_LOSS: heartbeat_loss_at,
        }
    )
    if client == "boinc" and faults:
        raise click.UsageError("fault injection needs the emulator; drop --client boinc")
    req = _request(
        workunit_dir,
        app_version,
        results_dir,
        data_dir,
        faults,
        name=name,
        timeout=timeout,
        checkpoint_period=checkpoint_period,
        keep_slot=keep_slot,
    )
    run = _runner(client)
    with _View() as view:
        summary = run(req, view.update)
    _report(summary, results_dir, as_json=as_json, asked=len(faults))


def _runner(client: str) -> Callable[[RunLocalRequest, Callable[[LiveState], None]], RunSummary]:
    """What runs the workunit: the client emulator, or the real client (``--client boinc``)."""
    if client == "boinc":
        from boincvm.runlocal.real_client import run_with_boinc_client

        return run_with_boinc_client
    from boincvm.runlocal.emulator import run_local

    return run_local


def _faults(specs: Mapping[FaultKind, tuple[str, ...]]) -> tuple[Fault, ...]:
    """The faults the ``--KIND-at WHEN`` options ask for.

    Raises:
        InputError: a WHEN is not of the documented form.
    """
    from boincvm.runlocal.faults import Fault

    return tuple(Fault.parse(kind, spec) for kind, kind_specs in specs.items() for spec in kind_specs)


def _request(
    workunit_dir: Path,
    app_version: Path,
    results_dir: Path,
    data_dir: Path | None,
    faults: tuple[Fault, ...],
    *,
    name: str | None,
    timeout: float,
    checkpoint_period: float,
    keep_slot: bool,
) -> RunLocalRequest:
    """The request, once the results directory is known to be no symlink.

    Raises:
        InputError: the results directory is or lies under a symlink.
    """
    from boincvm.paths import refuse_symlinks_in
    from boincvm.runlocal.emulator import default_data_dir
    from boincvm.runlocal.request import RunLocalRequest

    # Outputs, stderr.txt and summary.json are written there: never through a symlink.
    refuse_symlinks_in(results_dir, "--results directory")
    return RunLocalRequest(
        workunit_dir=workunit_dir,
        app_version_dir=app_version,
        results_dir=results_dir,
        data_dir=data_dir or default_data_dir(),
        workunit=name,
        faults=faults,
        timeout=timeout,
        checkpoint_period=checkpoint_period,
        keep_slot=keep_slot,
    )


def _report(summary: RunSummary, results_dir: Path, *, as_json: bool, asked: int) -> None:
    """Show the summary, write ``summary.json``; a failure or a missed fault is an error.

    Raises:
        WorkunitFailed: the workunit did not succeed.
        FaultsMissed: it did, but some of the ``asked`` faults never happened.
    """
    from boincvm.errors import FaultsMissed, WorkunitFailed

    _show_summary(summary)
    if as_json:
        console.out(json.dumps(summary.as_dict(), indent=2))
    (results_dir / "summary.json").write_text(
        json.dumps(summary.as_dict(), indent=2) + "\n", encoding="utf-8"
    )
    if not summary.ok:
        raise WorkunitFailed(
            f"workunit {summary.workunit}: {summary.outcome}: {summary.message}",
            hint=f"see {results_dir / 'stderr.txt'} for the wrapper's log",
        )
    if summary.faults_missed:
        raise FaultsMissed(
            f"the workunit succeeded, but {len(summary.faults_missed)} of {asked} requested faults "
            f"never happened: {summary.faults_missed[0]}",
            hint="pick a point the run reaches: for checkpoint:N, make the workunit with "
            "--checkpoint-interval below the run's length and give --checkpoint-period as short",
        )


#: How many of the guest program's latest output lines the live view shows, and how much of each.
OUTPUT_LINES = 3
OUTPUT_WIDTH = 100


class _View:
    """A rich live panel on a terminal; elsewhere plain lines for events, phase changes and
    the guest program's output as it comes."""

    def __init__(self) -> None:
        from rich.live import Live

        self.live = (
            Live(console=console.err, refresh_per_second=4, transient=False)
            if console.interactive()
            else None
        )
        self.last_phase = ""
        self.events_shown = 0
        self.output_shown = ""

    def __enter__(self) -> _View:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, state: LiveState) -> None:
        """Show ``state``: redraw the panel, or print what is new since the last call."""
        if self.live is not None:
            self.live.update(_panel(state))
            return
        for event in state.events[self.events_shown :]:
            console.info(event)
        self.events_shown = len(state.events)
        if state.phase != self.last_phase:
            console.info(
                f"{state.elapsed:6.1f}s  phase {state.phase}  ({state.fraction_done:.0%} done, "
                f"cpu {state.cpu_time:.1f} s, {state.checkpoints} checkpoints)"
            )
            self.last_phase = state.phase
        if state.last_output != self.output_shown:
            lines = _new_lines(_output_lines(self.output_shown), _output_lines(state.last_output))
            for line in lines:
                console.info(f"{state.elapsed:6.1f}s  guest: {line}")
            self.output_shown = state.last_output


def _new_lines(before: list[str], now: list[str]) -> list[str]:
    """The lines of ``now`` that follow what ``before`` already showed: after the longest
    end of ``before`` that ``now`` starts with (all of ``now`` when they share none)."""
    for k in range(min(len(before), len(now)), 0, -1):
        if before[-k:] == now[:k]:
            return now[k:]
    return now


def _panel(state: LiveState) -> Table:
    """The live panel: where the run is, the phases so far, the guest's output, recent events."""
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_row("phase", state.phase)
    if phases := state.history.render():
        table.add_row("phases", phases)
    table.add_row("fraction done", f"{state.fraction_done:6.1%}")
    table.add_row("CPU time", f"{state.cpu_time:8.1f} s")
    table.add_row("elapsed", f"{state.elapsed:8.1f} s")
    table.add_row("checkpoints", str(state.checkpoints))
    table.add_row(
        "checkpoint interval", _interval(state.checkpoint_interval, state.checkpoint_interval_source)
    )
    table.add_row("starts", str(state.starts))
    if state.accel:
        table.add_row("accelerator", state.accel)
    lines = _output_lines(state.last_output) or [""]
    for label, line in zip(["guest output"] + [""] * (len(lines) - 1), lines, strict=True):
        table.add_row(label, line)
    for event in state.events[-4:]:
        table.add_row("event", event)
    return table


def _output_lines(output: str) -> list[str]:
    """The guest's latest non-blank output lines, made safe for a terminal and cut to
    :data:`OUTPUT_WIDTH` (the start of a line says more than its end)."""
    lines = [console.printable(line.rstrip()) for line in output.splitlines() if line.strip()]
    return [
        line if len(line) <= OUTPUT_WIDTH else line[: OUTPUT_WIDTH - 3] + "..."
        for line in lines[-OUTPUT_LINES:]
    ]


def _interval(seconds: float, source: str) -> str:
    """The effective checkpoint interval and what decides it, in words."""
    from boincvm.runlocal.faults import describe_interval

    return f"{describe_interval(seconds)} ({source})"


def _show_summary(summary: RunSummary) -> None:
    from rich.table import Table

    table = Table(title=f"workunit {summary.workunit}", show_header=False)
    table.add_row("outcome", f"{summary.outcome} ({'ok' if summary.ok else 'FAILED'})")
    table.add_row("message", summary.message)
    table.add_row("elapsed", f"{summary.elapsed:.1f} s")
    table.add_row("CPU time claimed", f"{summary.cpu_time:.2f} s")
    table.add_row("credit claimed", f"{summary.credit_claimed:.4f}")
    table.add_row("checkpoints", str(summary.checkpoints))
    table.add_row(
        "checkpoint interval", _interval(summary.checkpoint_interval, summary.checkpoint_interval_source)
    )
    for missed in summary.faults_missed:
        table.add_row("FAULT MISSED", missed)
    table.add_row("starts", str(summary.starts))
    for phase, secs in summary.timings.items():
        table.add_row(f"time in {phase}", f"{secs:.2f} s")
    for o in summary.outputs:
        table.add_row(
            f"output {o['name']}",
            ("missing" if o["size"] is None else f"{o['size']} bytes")
            + (f"  ERROR: {o['error']}" if o.get("error") else ""),
        )
    for n, phases in enumerate(summary.phases, 1):
        table.add_row(f"phases, start {n}" if len(summary.phases) > 1 else "phases", phases)
    for t in summary.trickles:
        table.add_row(
            f"trickle up {console.printable(t['variety'])}", console.printable(t["text"].strip()[:200])
        )
    console.err.print(table)
