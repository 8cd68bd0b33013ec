"""Checkpoints that scale with what the guest touched, not with its RAM.

The same time-paced long job (examples/longjob) runs in guests of 512 MiB, 1, 2 and 4 GiB
(the app version's memory), checkpointing every 2 s, and is killed once two checkpoints
are committed, then resumed from the last one. Printed per size: seconds per checkpoint
as the job sees it, the restore after the kill, the bytes of RAM state per checkpoint
(the checkpoint directory's files for a RAM-diff checkpoint, else the snapshot's
``vm-state-size``), the overlay's size, and the QEMU's peak RSS; then
the ratio 4 GiB / 512 MiB. Last: the overlay after many checkpoints (old snapshots are
deleted as new ones commit), its allocated size and ``qemu-img check``'s verdict.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procstat import MIB, TreeSampler, loadavg  # noqa: E402

from boincvm import proc  # noqa: E402
from boincvm.appversion.build import package_image  # noqa: E402
from boincvm.appversion.model import AppVersionRequest  # noqa: E402
from boincvm.hypervisor.qemu import ramdiff  # noqa: E402
from boincvm.image.guest import build_guest_image  # noqa: E402
from boincvm.job import OutputFile, Task, VmJob  # noqa: E402
from boincvm.runlocal.emulator import run_local  # noqa: E402
from boincvm.runlocal.faults import Fault, FaultKind  # noqa: E402
from boincvm.runlocal.request import LiveState, RunLocalRequest, RunSummary  # noqa: E402
from boincvm.workunit.make import WorkunitRequest, make_workunits  # noqa: E402
from boincvm.workunit.templates import Resources  # noqa: E402
from tests.integration.jobs import LongJob  # noqa: E402


@dataclass(frozen=True)
class Size:
    memory_mb: int
    per_checkpoint: float
    restore: float
    state_bytes: int
    overlay_bytes: int
    peak_rss: int
    checkpoints: int


def _wu(root: Path, name: str, job: LongJob) -> Path:
    task = Task(
        application="/bin/sh", fraction_done_filename="fraction_done", credit_report_filename="credit_report"
    )
    out = root / name
    make_workunits(
        WorkunitRequest(
            app_name="ckscale",
            job=VmJob(task=task, output_files=(OutputFile("out", 100_000),), minimum_checkpoint_interval=0),
            output_dir=out,
            inputs=job.inputs,
            command_line=job.command_line,
            resources=Resources(rsc_memory_bound=8e9),
        )
    )
    return out


def _overlay(data: Path) -> tuple[int, int, list[int], str]:
    """(apparent size, allocated bytes, state sizes, qemu-img check's last line) of the
    job's overlay (``-U``: the running QEMU holds it); a snapshot's state is its RAM-diff
    checkpoint directory where it has one, else its ``vm-state-size``."""
    disks = sorted(data.rglob("disk.qcow2"), key=lambda p: p.stat().st_mtime)
    if not disks:
        return 0, 0, [], "no overlay found"
    disk = disks[-1]
    st = disk.stat()
    info = json.loads(proc.run(["qemu-img", "info", "-U", "--output=json", disk], timeout=60).text)
    states = []
    for snap in info.get("snapshots", []):
        d = ramdiff.checkpoint_dir(disk.parent, str(snap["name"]))
        states.append(ramdiff.size(d) if ramdiff.is_complete(d) else int(snap.get("vm-state-size", 0)))
    check = proc.run(["qemu-img", "check", "-U", disk], timeout=120, check=False)
    verdict = (check.text.strip().splitlines() or ["?"])[-1]
    return st.st_size, st.st_blocks * 512, states, verdict


@dataclass
class Seen:
    """The overlay as the checkpoints left it during the run (the wrapper deletes its
    snapshots at the end)."""

    checkpoints: int = 0
    states: tuple[int, ...] = ()
    alloc: int = 0
    size: int = 0
    verdict: str = ""


def _run(
    root: Path, wu: Path, av: Path, tag: str, period: float = 2.0, **kw: object
) -> tuple[RunSummary, int, Seen]:
    seen = Seen()
    data = root / f"client-{tag}"

    def watch(live: LiveState) -> None:
        if live.checkpoints > seen.checkpoints:
            seen.checkpoints = live.checkpoints
            size, alloc, states, verdict = _overlay(data)
            seen.states, seen.size, seen.alloc, seen.verdict = tuple(states), size, alloc, verdict

    with TreeSampler([os.getpid()], include_roots=False, interval=0.25) as s:
        summary = run_local(
            RunLocalRequest(
                workunit_dir=wu,
                app_version_dir=av,
                results_dir=root / f"res-{tag}",
                data_dir=data,
                checkpoint_period=period,
                timeout=1800,
                **kw,  # type: ignore[arg-type]
            ),
            watch,
        )
    if not summary.ok:
        raise RuntimeError(f"{tag}: {summary.message}")
    if "restore" not in summary.timings and kw.get("faults"):
        raise RuntimeError(f"{tag}: the job did not resume from its checkpoint: {summary.events}")
    qemu = max(
        (r for p, r in s.peaks.rss.items() if s.peaks.comm.get(p, "").startswith("boincvm-")), default=0
    )
    return summary, qemu, seen


def main(quick: bool = False) -> None:
    """Print the figures (``quick``: 512 MiB and 2 GiB, 20 checkpoints at the end)."""
    sizes = (512, 2048) if quick else (512, 1024, 2048, 4096)
    many = 20 if quick else 50
    job = LongJob(steps=10)
    print(f"== bench_checkpoint_scaling: guests of {', '.join(map(str, sizes))} MiB (load {loadavg()})")
    with tempfile.TemporaryDirectory(prefix="bench-ckscale-") as tmp:
        root = Path(tmp)
        image = build_guest_image("minimal")
        wu = _wu(root, "wu", job)
        warm_job = LongJob(steps=1)
        warm = _wu(root, "wu-warm", warm_job)
        results: list[Size] = []
        for mb in sizes:
            av = root / f"av-{mb}"
            package_image(
                AppVersionRequest(
                    image=image, app_name="ckscale", version="1.00", output_dir=av, memory_mb=mb
                )
            )
            t0 = time.perf_counter()
            run_local(
                RunLocalRequest(
                    workunit_dir=warm,
                    app_version_dir=av,
                    results_dir=root / f"rw-{mb}",
                    data_dir=root / f"client-{mb}",
                )
            )
            first = time.perf_counter() - t0
            load = loadavg()
            kill = (Fault.parse(FaultKind.KILL, "checkpoint:2"),)
            summary, rss, seen = _run(root, wu, av, f"{mb}", faults=kill)
            out = (root / f"res-{mb}" / "out").read_text()
            if out != job.expected_out:
                raise RuntimeError(f"{mb} MiB: wrong output after the resume: {out!r}")
            size, alloc, states = seen.size, seen.alloc, seen.states
            n = max(summary.checkpoints, 1)
            results.append(
                Size(
                    mb,
                    summary.timings.get("checkpoint", 0.0) / n,
                    summary.timings.get("restore", float("nan")),
                    max(states, default=0),
                    alloc,
                    rss,
                    summary.checkpoints,
                )
            )
            r = results[-1]
            print(
                f"  {mb:5} MiB: {r.checkpoints} checkpoints, {r.per_checkpoint:.2f} s each, restore"
                f" {r.restore:.2f} s, RAM state {r.state_bytes / MIB:.1f} MiB per checkpoint, overlay"
                f" {r.overlay_bytes / MIB:.1f} MiB allocated ({size / MIB:.1f} apparent), QEMU peak RSS"
                f" {r.peak_rss / MIB:.0f} MiB (load {load}; first run with its golden build {first:.1f} s)"
            )
        a, b = results[0], results[-1]
        ratio = [
            ("checkpoint s", b.per_checkpoint / a.per_checkpoint),
            ("restore s", b.restore / a.restore),
            ("state bytes", b.state_bytes / max(a.state_bytes, 1)),
            ("QEMU RSS", b.peak_rss / max(a.peak_rss, 1)),
        ]
        print(f"  {b.memory_mb} MiB / {a.memory_mb} MiB: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio))

        # Many checkpoints: the overlay keeps only the newest snapshots' clusters.
        long_job = LongJob(steps=many * 2)
        av = root / f"av-{sizes[0]}"
        t0 = time.perf_counter()
        summary, _, seen = _run(root, _wu(root, "wu-many", long_job), av, "many", period=0.5)
        print(
            f"  at checkpoint {seen.checkpoints} of {summary.checkpoints} ({time.perf_counter() - t0:.0f} s):"
            f" overlay {seen.alloc / MIB:.1f} MiB allocated, {seen.size / MIB:.1f} MiB apparent,"
            f" {len(seen.states)} snapshots kept; qemu-img check: {seen.verdict}"
        )


if __name__ == "__main__":
    main("--quick" in sys.argv)
