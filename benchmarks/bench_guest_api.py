"""Guest API checkpoints (issue #15) on a 1 GiB guest: VM snapshots against app-level files.

A BOINCified job (examples/apijob, the guest API's files written by a busybox script) runs
under run-local twice per mode: once through, once killed after its first checkpoint. It
prints the time per checkpoint (the wrapper's checkpoint phase over the checkpoints it
took), the bytes a checkpoint keeps (VM mode: the slot's overlay, which holds the disk
snapshot, and the checkpoint directory with the guest's own pages and device state; app
mode: the program's checkpoint files), and the time to resume.

Then how soon a checkpoint the program times is answered (issue #27): a busybox program
steps every 0.2 s and, each time the wrapper asks, says it is ready and waits for the
snapshot, as ``boinc_checkpoint_completed()`` does; it notes from the guest's clock
(``/proc/uptime``, 10 ms steps) how long each wait took. Beside it, the wrapper's own CPU
per second of the run, with checkpoints asked every few seconds and with none asked.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path

from procstat import TreeSampler

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest
from boincvm.image.guest import build_guest_image
from boincvm.job import CheckpointMode, OutputFile, Task, VmJob
from boincvm.runlocal.emulator import run_local
from boincvm.runlocal.faults import Fault, FaultKind
from boincvm.runlocal.request import RunLocalRequest, RunSummary
from boincvm.workunit.make import InputSpec, WorkunitRequest, make_workunits
from boincvm.workunit.templates import Resources

APIJOB = Path(__file__).resolve().parent.parent / "examples/apijob/apijob.sh"
STEPS = 20
MEMORY_MB = 1024
#: The program of the answer-time figure: ANSWERS checkpoints asked, then it ends.
ANSWER_JOB = r"""#!/bin/sh
A=$BOINCVM_API_DIR
up() { read -r u _ < /proc/uptime; echo "$u"; }
: > stalls
i=0
n=0
while [ "$n" -lt "$1" ] && [ "$i" -lt 3000 ]; do
    i=$((i + 1))
    sleep 0.2
    printf 'uses_checkpoints=1\nfraction_done=0.%04d\n' "$((n * 9999 / $1))" > "$A/status.tmp"
    mv "$A/status.tmp" "$A/status"
    if [ -f "$A/checkpoint_request" ]; then
        read -r req < "$A/checkpoint_request"
        t0=$(up)
        printf '%s\n' "$req" > "$A/checkpoint_ready.tmp" && mv "$A/checkpoint_ready.tmp" "$A/checkpoint_ready"
        while [ -f "$A/checkpoint_request" ]; do sleep 0.02; done
        t1=$(up)
        rm -f "$A/checkpoint_ready"
        echo "$t0 $t1" >> stalls
        n=$((n + 1))
    fi
done
"""
ANSWERS = 12


def _wu(root: Path, mode: CheckpointMode) -> Path:
    out = root / f"wu-{mode.value}"
    files = ("ck", "out") if mode is CheckpointMode.APP else ()
    job = VmJob(
        task=Task(application="/bin/sh"),
        output_files=(OutputFile("out", 1_000_000),),
        minimum_checkpoint_interval=0,
        memory_mb=MEMORY_MB,
        checkpoint_mode=mode,
        checkpoint_files=files,
    )
    make_workunits(
        WorkunitRequest(
            app_name="bench",
            job=job,
            output_dir=out,
            inputs=(InputSpec("apijob.sh", str(APIJOB)),),
            command_line=f"apijob.sh {STEPS} 1 0 0",
            resources=Resources(rsc_memory_bound=2e9),
        )
    )
    return out


def _run(root: Path, wu: Path, av: Path, tag: str, *faults: Fault) -> tuple[RunSummary, int]:
    summary = run_local(
        RunLocalRequest(
            workunit_dir=wu,
            app_version_dir=av,
            results_dir=root / f"res-{tag}",
            data_dir=root / "client",
            faults=faults,
            checkpoint_period=4.0,
            keep_slot=True,
        )
    )
    assert summary.ok, summary.message + summary.stderr_tail
    client = root / "client"
    kept = [*client.rglob("disk.qcow2"), *(d for d in client.rglob("checkpoints") if d.is_dir())]
    size = sum(_size(p) for p in kept)
    for p in kept:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return summary, size


def _size(path: Path) -> int:
    """Bytes a file, or every file under a directory, takes."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _answer_wu(root: Path, period_checkpoints: bool) -> Path:
    """A workunit of the answer-time program (``period_checkpoints`` False: no checkpoint is
    ever asked, the program steps for the same time and the wrapper idles beside it)."""
    script = root / "answer.sh"
    script.write_text(ANSWER_JOB)
    out = root / f"wu-answer-{period_checkpoints}"
    job = VmJob(
        task=Task(application="/bin/sh", time_limit=None if period_checkpoints else 30.0),
        output_files=(OutputFile("stalls", 100_000),),
        minimum_checkpoint_interval=0,
        checkpoint_mode=CheckpointMode.VM,
    )
    make_workunits(
        WorkunitRequest(
            app_name="bench",
            job=job,
            output_dir=out,
            inputs=(InputSpec("answer.sh", str(script)),),
            command_line=f"answer.sh {ANSWERS if period_checkpoints else 1000}",
        )
    )
    return out


def _answers(root: Path, av: Path, period_checkpoints: bool) -> tuple[list[float], float, float]:
    """(each answer in seconds, the wrapper's CPU seconds per second of run, the run's seconds)."""
    wu = _answer_wu(root, period_checkpoints)
    tag = f"answer-{period_checkpoints}"
    with TreeSampler([os.getpid()], include_roots=False, interval=0.2) as sampler:
        summary = run_local(
            RunLocalRequest(
                workunit_dir=wu,
                app_version_dir=av,
                results_dir=root / f"res-{tag}",
                data_dir=root / f"client-{tag}",
                checkpoint_period=2.0 if period_checkpoints else 3600.0,
            )
        )
    assert summary.ok, summary.message + summary.stderr_tail
    peaks = sampler.peaks
    wrapper_cpu = sum(c for p, c in peaks.cpu.items() if not peaks.comm.get(p, "").startswith("qemu"))
    run = summary.timings.get("run", summary.elapsed)
    lines = (root / f"res-{tag}/stalls").read_text().split("\n")
    waits = [float(b) - float(a) for a, b in (ln.split() for ln in lines if ln.strip())]
    return waits, wrapper_cpu / max(summary.elapsed, 1e-9), run


def answer_figures(root: Path, av: Path) -> None:
    """Print how soon a checkpoint the program times is answered, and the wrapper's CPU."""
    waits, cpu_asked, _ = _answers(root, av, True)
    _, cpu_idle, _ = _answers(root, av, False)
    if not waits:
        print("  answer: no checkpoint was asked")
        return
    print(
        f"  answer to boinc_checkpoint_completed() over {len(waits)} checkpoints (guest clock): "
        f"min {min(waits):.2f} s, median {statistics.median(waits):.2f} s, max {max(waits):.2f} s"
    )
    print(
        f"  wrapper CPU per second of run (its process and helpers, QEMU aside): "
        f"{cpu_asked:.3f} with a checkpoint asked every 2 s, {cpu_idle:.3f} with none asked"
    )


def main() -> None:
    """Print the figures."""
    print(f"== guest API checkpoints on a {MEMORY_MB} MiB guest (TCG, run-local, apijob {STEPS} x 1 s)")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        av = root / "av"
        package_image(
            AppVersionRequest(
                image=build_guest_image("minimal"), app_name="bench", version="1.00", output_dir=av
            )
        )
        for mode in (CheckpointMode.VM, CheckpointMode.APP):
            wu = _wu(root, mode)
            through, overlay = _run(root, wu, av, f"{mode.value}-through")
            n = max(through.checkpoints, 1)
            per = through.timings.get("checkpoint", 0.0) / n
            kept = (
                overlay
                if mode is CheckpointMode.VM
                else (root / f"res-{mode.value}-through/out").stat().st_size + 16
            )
            killed, _ = _run(
                root, wu, av, f"{mode.value}-killed", Fault.parse(FaultKind.KILL, "checkpoint:1")
            )
            resume = killed.timings.get("restore", 0.0)
            what = "slot overlay and checkpoint files" if mode is CheckpointMode.VM else "the files"
            print(
                f"  {mode.value:3}: {through.checkpoints} checkpoints, {per:.2f} s each; "
                f"{kept:,} bytes kept ({what}); "
                f"resume after a kill {resume:.2f} s; whole run {through.elapsed:.1f} s"
            )
        answer_figures(root, av)


if __name__ == "__main__":
    main()
