"""hello as a whole task from a golden checkpoint, and where its time goes.

The example guest runs ``tr a-z A-Z < in > out`` under the app version's own main program
(the frozen wrapper's launcher, its runtime unpacked), in a client data directory that has
run it once already (golden checkpoint built, runtimes unpacked), as a volunteer's second
task. Measured from the main program's start to the emulated client noticing its exit:

- with the client polling every 5 ms: what the wrapper and the VM cost;
- with the client's own one poll a second: what a volunteer's client sees (its poll
  rounds the task up to the next second);
- the same task with 100 MB in and 100 MB out that the guest only moves (``mv in out``),
  alternating with hello: less hello, round by round, what the copies into and out of the
  guest cost (Podman bind-mounts its files: it copies nothing, see ``bench_peers``).

Then one run of the same task with the zip application under :mod:`cProfile`: every
function of boincvm (and the agent's and QMP's calls) that takes 10 ms or more, with its
cumulative and own time, so each 10 ms of the task is accounted for. On this machine type
QEMU runs under TCG (nested KVM fails), which slows the guest's side of every step.
"""

from __future__ import annotations

import hashlib
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest, WrapperKind
from boincvm.boinc.client import ClientOptions, LocalClient
from boincvm.image.guest import build_guest_image
from boincvm.job import OutputFile, Task, VmJob
from boincvm.runlocal.request import RunLocalRequest
from boincvm.runlocal.task import build_task
from boincvm.workunit.make import InputSpec, WorkunitRequest, make_workunits
from boincvm.workunit.templates import Resources

ROUNDS = 7
#: The bulk task's input and output: 100 MB each way.
BULK_BYTES = 100_000_000
#: The profiled wrapper's own start (python -c): writes its profile where the bench reads it.
_PROFILED = (
    "import cProfile, runpy, sys; target = sys.argv[1]; sys.argv = sys.argv[1:]; sys.path.insert(0, target); "
    "p = cProfile.Profile(); p.enable()\n"
    "try:\n    runpy.run_path(target, run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    "p.disable(); p.dump_stats({out!r})"
)


def _workunit(root: Path, name: str, script: str, given: Path) -> Path:
    """A workunit running ``script`` on the input ``given`` (named ``in`` in the guest)."""
    d = root / name
    d.mkdir()
    (d / "job.sh").write_text(script)
    wu = root / f"wu-{name}"
    make_workunits(
        WorkunitRequest(
            app_name="hello",
            job=VmJob(
                task=Task(application="/bin/sh"),
                output_files=(OutputFile("out", 2 * BULK_BYTES),),
                disable_automatic_checkpoints=True,
            ),
            output_dir=wu,
            inputs=(InputSpec("job.sh", str(d / "job.sh")), InputSpec("in", str(given))),
            command_line="job.sh",
            resources=Resources(rsc_memory_bound=1e9, rsc_disk_bound=4 * BULK_BYTES),
        )
    )
    return wu


def _bulk_workunit(root: Path) -> tuple[Path, str]:
    """100 MB (random) in, moved to ``out`` in the guest (``mv``: no work on the data), and
    the input's sha256, which the output must have."""
    bulk = root / "bulk"
    bulk.mkdir()
    digest = hashlib.sha256()
    with (bulk / "in").open("wb") as f:
        for _ in range(BULK_BYTES // 1_000_000):
            chunk = os.urandom(1_000_000)
            digest.update(chunk)
            f.write(chunk)
    return _workunit(bulk, "move", "mv in out\n", bulk / "in"), digest.hexdigest()


def _hello_workunit(root: Path) -> Path:
    """hello: ``world`` in, upper-cased to ``out``."""
    given = root / "world"
    given.write_text("world\n")
    return _workunit(root, "hello", "tr a-z A-Z < in > out\n", given)


def _run(
    root: Path, wu: Path, av: Path, slot: int, options: ClientOptions, sha256: str | None = None
) -> float:
    """Seconds from the main program's start to the client noticing its exit; the output is
    hello's ``WORLD`` or, with ``sha256``, a file of that digest."""
    data = root / f"client-{av.name}"
    task = build_task(RunLocalRequest(workunit_dir=wu, app_version_dir=av, results_dir=root, data_dir=data))
    with LocalClient(data, task, slot=slot, options=options) as client:
        t0 = time.perf_counter()
        client.start()
        outcome = client.wait(300)
        took = time.perf_counter() - t0
    if outcome is None or not outcome.ok:
        raise RuntimeError(f"hello failed: {outcome}")
    (out,) = outcome.outputs
    if sha256 is not None:
        if hashlib.sha256(out.path.read_bytes()).hexdigest() != sha256:
            raise RuntimeError("the 100 MB output is not the input")
    elif out.path.read_bytes() != b"WORLD\n":
        raise RuntimeError("hello's output is not WORLD")
    return took


def _fmt(xs: list[float]) -> str:
    return f"{min(xs):6.3f} {statistics.median(xs):6.3f} {max(xs):6.3f}"


def _profile(root: Path, wu: Path, av: Path) -> None:
    stats_file = root / "hello.prof"
    launcher = (sys.executable, "-c", _PROFILED.format(out=str(stats_file)))
    wall = _run(root, wu, av, 99, ClientOptions(poll_period=0.005, launcher=launcher))
    stats = pstats.Stats(str(stats_file))
    rows = []
    for (path, line, name), (_cc, _nc, own, cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if cum >= 0.010 and ("boincvm" in path or "qemu/qmp" in path):
            where = path.split("boincvm/", 1)[-1] if "boincvm/" in path else Path(path).name
            rows.append((cum, own, f"{where}:{line}({name})"))
    print(
        f"  profiled run (zip application under cProfile, 5 ms polls): {wall:.3f} s; boincvm calls >= 10 ms:"
    )
    print("      cum ms  own ms  function")
    for cum, own, label in sorted(rows, reverse=True):
        print(f"    {cum * 1000:8.1f} {own * 1000:7.1f}  {label}")


def main(quick: bool = False) -> None:
    """Print hello's whole-task times (5 ms and 1 s client polls) and a profile of one run."""
    rounds = 3 if quick else ROUNDS
    print(f"== hello as a whole task from a golden checkpoint ({rounds} rounds each, alternating; TCG)")
    image = build_guest_image("minimal")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        avs = {}
        for kind in (WrapperKind.FROZEN, WrapperKind.PYZ):
            avs[kind] = root / f"av-{kind.value}"
            package_image(
                AppVersionRequest(
                    image=image, app_name="hello", version="1", output_dir=avs[kind], wrapper=kind
                )
            )
        wu = _hello_workunit(root)
        bulk, digest = _bulk_workunit(root)
        fast, client = ClientOptions(poll_period=0.005), ClientOptions()
        frozen = avs[WrapperKind.FROZEN]
        _run(root, wu, frozen, 0, fast)  # golden checkpoint, runtimes: not counted
        _run(root, wu, avs[WrapperKind.PYZ], 0, ClientOptions(launcher=(sys.executable,)))
        polled: list[float] = []
        second: list[float] = []
        moved: list[float] = []
        for i in range(rounds):
            polled.append(_run(root, wu, frozen, 1 + 3 * i, fast))
            second.append(_run(root, wu, frozen, 2 + 3 * i, client))
            moved.append(_run(root, bulk, frozen, 3 + 3 * i, fast, digest))
            os.sync()  # its 200 MB on the host's disk, not written back under the next hello
        copies = [m - h for m, h in zip(moved, polled, strict=True)]
        print("                                              min    median max (s)")
        print(f"  frozen wrapper, client polling every 5 ms: {_fmt(polled)}")
        print(f"  frozen wrapper, client polling every 1 s:  {_fmt(second)}")
        print(f"  100 MB in, mv in out, 100 MB out (5 ms):   {_fmt(moved)}")
        print(f"  ... less hello, round by round: the copies {_fmt(copies)}")
        _profile(root, wu, avs[WrapperKind.PYZ])


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
