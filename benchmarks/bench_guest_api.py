"""Guest API checkpoints (issue #15) on a 1 GiB guest: VM snapshots against app-level files.

A BOINCified job (examples/apijob, the guest API's files written by a busybox script) runs
under run-local twice per mode: once through, once killed after its first checkpoint. It
prints the time per checkpoint (the wrapper's checkpoint phase over the checkpoints it
took), the bytes a checkpoint keeps (VM mode: the slot's overlay, which holds the disk
snapshot, and the checkpoint directory with the guest's own pages and device state; app
mode: the program's checkpoint files), and the time to resume.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

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


def _wu(root: Path, mode: CheckpointMode) -> Path:
    out = root / f"wu-{mode.value}"
    files = ("ck", "out") if mode is CheckpointMode.APP else ()
    job = VmJob(
        task=Task(application="/bin/sh"),
        output_files=(OutputFile("out", 1_000_000),),
        minimum_checkpoint_interval=0,
        memory_size_mb=MEMORY_MB,
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


if __name__ == "__main__":
    main()
