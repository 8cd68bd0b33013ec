"""A host full of tasks: 1, 2, 4 and 8 run-local tasks of one app version started together.

BOINC runs one task per core; VM apps are known for start-up storms. Each task has its
own client data directory and runs the time-paced long job (examples/longjob). Measured:
seconds from the common start until the last task runs its job (its first fraction done
above 0), the peak of the summed RSS and PSS of every wrapper and QEMU process (sampled
from /proc), the sum of the per-process RSS peaks of the QEMUs, the memory each extra
task adds, the peak rise of the host's memory in use (MemTotal - MemFree: shared pages
once, page cache included) and of what free(1) calls used (MemTotal - MemAvailable: the
page cache the kernel can drop left out), and whether every task's result is right (every step
once, then the sum).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procstat import MIB, TreeSampler, loadavg  # noqa: E402

from boincvm.appversion.build import package_image  # noqa: E402
from boincvm.appversion.model import AppVersionRequest  # noqa: E402
from boincvm.image.guest import build_guest_image  # noqa: E402
from boincvm.job import OutputFile, Task, VmJob  # noqa: E402
from boincvm.runlocal.emulator import run_local  # noqa: E402
from boincvm.runlocal.request import LiveState, RunLocalRequest, RunSummary  # noqa: E402
from boincvm.workunit.make import WorkunitRequest, make_workunits  # noqa: E402
from boincvm.workunit.templates import Resources  # noqa: E402
from tests.integration.jobs import LongJob  # noqa: E402


@dataclass
class Task_:
    running_at: float | None = None
    summary: RunSummary | None = None
    error: str = ""


@dataclass(frozen=True)
class Wave:
    n: int
    all_running: float
    wall: float
    peak_rss: int
    peak_pss: int
    qemu_rss: int
    ok: int
    #: Peak rise of the host's memory in use (MemTotal - MemFree, page cache included)
    #: over its level just before the start: shared pages count once, as on the host.
    host_used: int
    #: The same for what free(1) calls used (MemTotal - MemAvailable): page cache the
    #: kernel can drop (the slots' files, written and flushed) does not count.
    host_unavailable: int


def _wu(root: Path, name: str, job: LongJob, memory_mb: int | None = None) -> Path:
    task = Task(
        application="/bin/sh", fraction_done_filename="fraction_done", credit_report_filename="credit_report"
    )
    out = root / name
    make_workunits(
        WorkunitRequest(
            app_name="hostfull",
            job=VmJob(
                task=task,
                output_files=(OutputFile("out", 100_000),),
                disable_automatic_checkpoints=True,
                **({"memory_mb": memory_mb} if memory_mb else {}),  # type: ignore[arg-type]
            ),
            output_dir=out,
            inputs=job.inputs,
            command_line=job.command_line,
            resources=Resources(rsc_memory_bound=1e9),
        )
    )
    return out


def wave(root: Path, av: Path, wu: Path, job: LongJob, n: int, tag: str, first: int = 0) -> Wave:
    """Start ``n`` tasks together and wait for all of them."""
    tasks = [Task_() for _ in range(n)]
    start = threading.Barrier(n + 1)
    t0 = 0.0

    def one(i: int) -> None:
        t = tasks[i]

        def watch(s: LiveState) -> None:
            if t.running_at is None and s.fraction_done > 0:
                t.running_at = time.monotonic() - t0

        start.wait()
        try:
            t.summary = run_local(
                RunLocalRequest(
                    workunit_dir=wu,
                    app_version_dir=av,
                    results_dir=root / f"res-{tag}-{n}-{i}",
                    data_dir=root / f"client-{first + i}",
                    timeout=1800,
                ),
                watch,
            )
        except Exception as exc:  # noqa: BLE001 -- reported per task, the others go on
            t.error = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    used = _HostUsed()
    with TreeSampler([os.getpid()], include_roots=False, interval=0.25, pss=True) as s, used:
        t0 = time.monotonic()
        start.wait()
        for th in threads:
            th.join()
        wall = time.monotonic() - t0
    ok = 0
    for i, t in enumerate(tasks):
        out = root / f"res-{tag}-{n}-{i}" / "out"
        if t.summary is not None and t.summary.ok and out.is_file() and out.read_text() == job.expected_out:
            ok += 1
        else:
            why = t.error or (t.summary.message if t.summary else "no summary")
            print(f"    task {i + 1}/{n} failed: {why}")
    running = [t.running_at for t in tasks if t.running_at is not None]
    qemu = s.peaks.peak_rss_of(lambda c: c.startswith("boincvm-") or c.startswith("qemu"))
    return Wave(
        n,
        max(running) if running else float("nan"),
        wall,
        s.peaks.peak_rss,
        s.peaks.peak_pss,
        qemu,
        ok,
        used.peak[0] - used.before[0],
        used.peak[1] - used.before[1],
    )


def _in_use() -> tuple[int, int]:
    """MemTotal - MemFree and MemTotal - MemAvailable, in bytes."""
    info = {
        k: int(v.split()[0]) * 1024
        for k, v in (ln.split(":", 1) for ln in Path("/proc/meminfo").read_text().splitlines())
    }
    return info["MemTotal"] - info["MemFree"], info["MemTotal"] - info["MemAvailable"]


def _max(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return max(a[0], b[0]), max(a[1], b[1])


class _HostUsed:
    """Samples :func:`_in_use` every 0.25 s while the block runs; ``peak`` and ``before``
    (each a pair: with page cache, without what the kernel can drop)."""

    def __init__(self) -> None:
        self.before = self.peak = _in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = _max(self.peak, _in_use())

    def __enter__(self) -> _HostUsed:
        self.before = self.peak = _in_use()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = _max(self.peak, _in_use())


def print_waves(waves: list[Wave]) -> None:
    base = waves[0]
    for w in waves:
        extra = ""
        if w.n > 1:
            per = (w.peak_rss - base.peak_rss) / (w.n - 1) / MIB
            per_pss = (w.peak_pss - base.peak_pss) / (w.n - 1) / MIB
            per_host = (w.host_used - base.host_used) / (w.n - 1) / MIB
            per_used = (w.host_unavailable - base.host_unavailable) / (w.n - 1) / MIB
            extra = (
                f", per extra task {per:.0f} MiB RSS / {per_pss:.0f} MiB PSS / host {per_host:.0f} MiB"
                f" in use, {per_used:.0f} MiB used"
            )
        print(
            f"    {w.n} tasks: all running after {w.all_running:.1f} s, all done {w.wall:.1f} s;"
            f" peak {w.peak_rss / MIB:.0f} MiB RSS / {w.peak_pss / MIB:.0f} MiB PSS"
            f" / host +{w.host_used / MIB:.0f} MiB in use, +{w.host_unavailable / MIB:.0f} MiB used"
            f" (QEMU RSS peaks summed {w.qemu_rss / MIB:.0f} MiB){extra}; {w.ok}/{w.n} correct"
        )


def main(quick: bool = False) -> None:
    """Print the figures (``quick``: 1, 2 and 4 tasks of a shorter job)."""
    counts = (1, 2, 4) if quick else (1, 2, 4, 8)
    job = LongJob(steps=8 if quick else 12)
    print(f"== bench_host_full: {', '.join(map(str, counts))} long jobs started together (load {loadavg()})")
    with tempfile.TemporaryDirectory(prefix="bench-hostfull-") as tmp:
        root = Path(tmp)
        av = root / "av"
        package_image(
            AppVersionRequest(
                image=build_guest_image("minimal"), app_name="hostfull", version="1.00", output_dir=av
            )
        )
        wu = _wu(root, "wu", job)
        warm = LongJob(steps=1)
        # Each data directory gets its own copy of the app version's files, and so its own
        # golden checkpoint (keyed on the files' paths): a real client has one project
        # directory, so build them all first and measure tasks that start from one.
        wu_warm = _wu(root, "wu-warm", warm)
        for i in range(max(counts)):
            wave(root, av, wu_warm, warm, 1, f"warmup{i}", first=i)
        waves = []
        for n in counts:
            load = loadavg()
            w = wave(root, av, wu, job, n, "run")
            waves.append(w)
            print(f"    ({n} tasks started at load {load})")
        print_waves(waves)


if __name__ == "__main__":
    main("--quick" in sys.argv)
