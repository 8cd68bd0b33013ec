"""run-local figures: hello overhead (warm and first run), wrapper CPU use, checkpoint cost.

Everything runs for real: the bundled guest under QEMU (TCG here), the app version's own
wrapper as a separate process, the client emulator.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest
from boincvm.image.guest import build_guest_image
from boincvm.job import OutputFile, Task, VmJob
from boincvm.runlocal.emulator import run_local
from boincvm.runlocal.request import LiveState, RunLocalRequest, RunSummary
from boincvm.workunit.make import InputSpec, WorkunitRequest, make_workunits
from boincvm.workunit.templates import Resources
from boincvm.wrapper.steps import STEADY_AFTER

LONGJOB = Path(__file__).resolve().parent.parent / "examples/longjob/program/bin/longjob"


def _wu(
    root: Path, name: str, command_line: str, *, inputs: tuple[InputSpec, ...] = (), **job: object
) -> Path:
    task = Task(
        application="/bin/sh", fraction_done_filename="fraction_done", credit_report_filename="credit_report"
    )
    out = root / name
    make_workunits(
        WorkunitRequest(
            app_name="bench",
            job=VmJob(task=task, output_files=(OutputFile("out", 1_000_000),), **job),  # type: ignore[arg-type]
            output_dir=out,
            inputs=inputs,
            command_line=command_line,
            resources=Resources(rsc_memory_bound=1e9),
        )
    )
    return out


def _run(
    root: Path, wu: Path, av: Path, tag: str, also: Callable[[LiveState], None] | None = None, **kw: object
) -> tuple[RunSummary, list[LiveState]]:
    """Run ``wu`` and keep every live state; ``also`` sees each one as it comes."""
    states: list[LiveState] = []

    def watch(s: LiveState) -> None:
        states.append(LiveState(**{**s.__dict__, "events": []}))
        if also is not None:
            also(s)

    summary = run_local(
        RunLocalRequest(
            workunit_dir=wu,
            app_version_dir=av,
            results_dir=root / f"res-{tag}",
            data_dir=root / "client",
            **kw,  # type: ignore[arg-type]
        ),
        watch,
    )
    assert summary.ok, summary.message
    return summary, states


def _cpu(pid: int) -> float:
    """CPU seconds of the wrapper: the main program and its descendants, QEMU left out.

    The frozen wrapper's main program is PyInstaller's loader, whose child runs the wrapper;
    counting the loader alone would measure an idle process.
    """
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            # QEMU is argv[0], or a few arguments after the bundled runtime's loader.
            if any(b"qemu-system" in a for a in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[:4]):
                continue
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main() -> None:
    """Print the figures."""
    print("== run-local (TCG guest, the app version's own wrapper, client emulator)")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        av = root / "av"
        package_image(
            AppVersionRequest(
                image=build_guest_image("minimal"), app_name="bench", version="1.00", output_dir=av
            )
        )
        (root / "world.txt").write_text("world\n")
        hello = _wu(
            root, "hello", '-c "tr a-z A-Z < in > out"', inputs=(InputSpec("in", str(root / "world.txt")),)
        )
        first, _ = _run(root, hello, av, "first")
        warm = [_run(root, hello, av, f"warm{i}")[0] for i in range(3)]
        best = min(warm, key=lambda s: s.elapsed)
        print(f"  hello, first run on this app version (golden checkpoint built): {first.elapsed:5.2f} s")
        print(
            f"  hello, prepared checkpoint: {best.elapsed:5.2f} s in all (best of 3; goal: overhead <= 1.5 s)"
        )
        print("    " + ", ".join(f"{k} {v:.2f} s" for k, v in best.timings.items()))

        # Wrapper CPU while a 40-s guest program runs: over the whole run phase, and once the
        # wrapper polls at its steady pace (after the first STEADY_AFTER seconds).
        sleeper = _wu(root, "sleep", "-c 'sleep 40; echo done > out'", disable_automatic_checkpoints=True)
        whole: list[float] = []
        steady: list[float] = []
        for i in range(3):
            samples: list[tuple[float, float, float]] = []

            def watch(s: LiveState, samples: list[tuple[float, float, float]] = samples) -> None:
                if s.phase == "run" and s.wrapper_pid and s.elapsed > 0:
                    try:
                        samples.append((time.monotonic(), _cpu(s.wrapper_pid), s.elapsed))
                    except OSError:
                        return

            _run(root, sleeper, av, f"sleep{i}", also=watch)
            (t0, c0, e0), (t1, c1, _) = samples[0], samples[-1]
            whole.append((c1 - c0) / (t1 - t0) * 100)
            later = [x for x in samples if x[2] >= e0 + STEADY_AFTER + 2]
            if len(later) > 1:
                steady.append((later[-1][1] - later[0][1]) / (later[-1][0] - later[0][0]) * 100)
        print(
            f"  wrapper CPU while the guest runs (3 runs of 40 s; goal well below 1 %): whole run phase"
            f" {min(whole):.2f} / {sorted(whole)[1]:.2f} / {max(whole):.2f} % of a core (min/median/max),"
            f" steady polling {min(steady, default=0):.2f}-{max(steady, default=0):.2f} %"
        )

        # The long job is paced by the guest's clock (12 steps of 1 s), so it lasts as long on
        # any host and the checkpoint figures are about the same amount of work everywhere.
        script = (InputSpec("longjob.sh", str(LONGJOB)),)
        line = "longjob.sh 12 1 0 sleep"
        with_ck = _wu(root, "ck", line, inputs=script, minimum_checkpoint_interval=0)
        without = _wu(root, "nock", line, inputs=script, disable_automatic_checkpoints=True)
        s_ck, _ = _run(root, with_ck, av, "ck", checkpoint_period=2.0)
        s_no, _ = _run(root, without, av, "nock")
        if s_ck.checkpoints < 3:
            taken = s_ck.checkpoints
            print(f"  long job: only {taken} checkpoints were taken (3 needed): no checkpoint figure")
            return
        per = s_ck.timings.get("checkpoint", 0.0) / s_ck.checkpoints
        print(
            f"  long job (12 s on the guest's clock): {s_ck.checkpoints} checkpoints, {per:.2f} s each as the"
            f" job sees it; run time {s_ck.timings.get('run', 0):.1f} s with vs"
            f" {s_no.timings.get('run', 0):.1f} s without (ratio {s_ck.elapsed / s_no.elapsed:.2f} total)"
        )


if __name__ == "__main__":
    main()
