"""The same program on the same inputs as a plain host process, under boincvm and under Podman.

Per program (hello; the long job, paced by time; a compute-bound job of fixed work; a job
with a 100 MB input and output, copied by ``cat``; the same files moved by ``mv``, which
leaves only the copies into and out of the guest) the three runtimes run in turn, pair after pair
(native, boincvm, podman, native, ...), so a busy host slows all alike. Every runtime runs
the same static busybox (the host's, the guest's own busybox for boincvm: the same
applets) on the same script. Measured per run: end-to-end seconds, host CPU seconds of
everything the runtime started (the plain process; wrapper + QEMU; podman + conmon + the
container) and peak memory (the summed RSS of those processes). Printed: medians and the
ratios boincvm/native and boincvm/podman as median (min-max) over the pairs.

``native`` is the physical limit: BOINC's plain ``wrapper`` adds next to nothing to it.
The compute-bound job's boincvm/native ratio is TCG's (QEMU emulating the CPU in software,
as on this host where nested KVM fails), not the design's: with KVM a guest computes at
close to native speed.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procstat import MIB, TreeSampler, loadavg, spread, wait_rusage  # noqa: E402

from boincvm import proc  # noqa: E402
from boincvm.appversion.build import package_image  # noqa: E402
from boincvm.appversion.model import AppVersionRequest  # noqa: E402
from boincvm.errors import BoincvmError  # noqa: E402
from boincvm.image.guest import build_guest_image  # noqa: E402
from boincvm.job import OutputFile, Task, VmJob  # noqa: E402
from boincvm.runlocal.emulator import run_local  # noqa: E402
from boincvm.runlocal.request import RunLocalRequest  # noqa: E402
from boincvm.workunit.make import InputSpec, WorkunitRequest, make_workunits  # noqa: E402
from boincvm.workunit.templates import Resources  # noqa: E402
from tests.oci_images import M, layer_tar, umoci_layout  # noqa: E402

LONGJOB = Path(__file__).resolve().parents[1] / "examples/longjob/program/bin/longjob"
APPLETS = ("sh", "awk", "sleep", "dd", "echo", "cat", "tr")
COMPUTE_ITERATIONS = 3_000_000
BULK_BYTES = 100 * 1000 * 1000
TAG = "localhost/boincvm-bench-peers:latest"
#: As in bench_oci: what lets podman start a container on this host.
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n'


@dataclass(frozen=True)
class Program:
    """``sh SCRIPT ARGS`` in a directory holding the script and the inputs; ``out`` is checked."""

    name: str
    script: str
    args: str = ""
    inputs: tuple[tuple[str, Path], ...] = ()
    out_bytes: int = 1_000_000

    @property
    def argv(self) -> list[str]:
        return ["sh", "job.sh", *self.args.split()]


@dataclass(frozen=True)
class Sample:
    wall: float
    cpu: float
    mem: int
    out: bytes


def _programs(work: Path, quick: bool) -> list[Program]:
    hello_in = work / "world.txt"
    hello_in.write_text("world\n")
    bulk_in = work / "bulk.bin"
    with bulk_in.open("wb") as f:
        for _ in range(BULK_BYTES // MIB):
            f.write(os.urandom(MIB))
        f.write(os.urandom(BULK_BYTES % MIB))
    steps = 6 if quick else 10
    return [
        Program("hello", "tr a-z A-Z < in > out\n", inputs=(("in", hello_in),)),
        Program("longjob", LONGJOB.read_text(), f"{steps} 1 0 sleep", out_bytes=100_000),
        Program(
            "compute",
            f"awk 'BEGIN {{ s = 0; for (i = 0; i < {COMPUTE_ITERATIONS}; i++) s += i % 7; print s }}'"
            " > out\n",
        ),
        Program("bulk100MB", "cat in > out\n", inputs=(("in", bulk_in),), out_bytes=2 * BULK_BYTES),
        # The same data in and out with no work on it: what the copies alone cost.
        Program("move100MB", "mv in out\n", inputs=(("in", bulk_in),), out_bytes=2 * BULK_BYTES),
    ]


def _stage(p: Program, d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "job.sh").write_text(p.script)
    for name, src in p.inputs:
        os.link(src, d / name) if src.stat().st_dev == d.stat().st_dev else shutil.copy(src, d / name)
    return d


# -- native -------------------------------------------------------------------------------
def _native(p: Program, d: Path, bindir: Path) -> Sample:
    """Run under ``busybox time -v``: a small parent, so the peak RSS is the job's own (a
    process forked from this Python would carry Python's peak into its ``ru_maxrss``)."""
    _stage(p, d)
    log = d / "time.txt"
    t0 = time.perf_counter()
    argv = ["/bin/busybox", "time", "-v", *p.argv]
    child = proc.spawn(argv, cwd=d, env={"PATH": str(bindir)}, log_file=log)
    code, cpu, _ = wait_rusage(child.pid, 600)
    wall = time.perf_counter() - t0
    child.returncode = code
    if code != 0:
        raise RuntimeError(f"native {p.name} exited with {code}: {log.read_text()[-500:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text())
    return Sample(wall, cpu, int(m.group(1)) * 1024 if m else 0, (d / "out").read_bytes())


# -- boincvm ------------------------------------------------------------------------------
def _boincvm_wu(p: Program, root: Path) -> Path:
    staged = _stage(p, root / f"in-{p.name}")
    task = Task(
        application="/bin/sh", fraction_done_filename="fraction_done", credit_report_filename="credit_report"
    )
    out = root / f"wu-{p.name}"
    make_workunits(
        WorkunitRequest(
            app_name="peers",
            job=VmJob(
                task=task, output_files=(OutputFile("out", p.out_bytes),), disable_automatic_checkpoints=True
            ),
            output_dir=out,
            inputs=(
                InputSpec("job.sh", str(staged / "job.sh")),
                *(InputSpec(n, str(staged / n)) for n, _ in p.inputs),
            ),
            command_line=" ".join(p.argv[1:]),
            resources=Resources(rsc_memory_bound=1e9),
        )
    )
    return out


def _boincvm(wu: Path, av: Path, root: Path, run: str) -> Sample:
    res = root / f"res-{run}"
    t0 = time.perf_counter()
    with TreeSampler([os.getpid()], include_roots=False) as s:
        summary = run_local(
            RunLocalRequest(
                workunit_dir=wu, app_version_dir=av, results_dir=res, data_dir=root / "client", timeout=900
            )
        )
    wall = time.perf_counter() - t0
    if not summary.ok:
        raise RuntimeError(f"boincvm {run}: {summary.message}")
    out = (res / "out").read_bytes()
    shutil.rmtree(res)
    return Sample(wall, s.peaks.cpu_seconds, s.peaks.peak_rss, out)


# -- podman -------------------------------------------------------------------------------
def _podman_setup(work: Path, env: dict[str, str]) -> str | None:
    """Load the busybox image into podman's storage; None when that worked, else why not."""
    if proc.which("podman") is None or proc.which("umoci") is None or proc.which("skopeo") is None:
        return "podman, umoci or skopeo is not installed"
    layer = work / "layer.tar"
    members = [
        M("bin", "dir", mode=0o755),
        M("bin/busybox", data=Path("/bin/busybox").read_bytes(), mode=0o755),
        *(M(f"bin/{a}", "symlink", link="busybox", mode=0o777) for a in APPLETS),
        M("tmp", "dir", mode=0o1777),
        M("work", "dir", mode=0o755, uid=0, gid=0),
    ]
    layer.write_bytes(layer_tar(members))
    layout = umoci_layout(work / "layout", layer, "--config.workingdir=/work", "--config.env=PATH=/bin")
    try:
        proc.run(["skopeo", "copy", "-q", f"oci:{layout}:latest", f"containers-storage:{TAG}"], timeout=300)
        proc.run(
            ["podman", "run", "--rm", "--network", "none", TAG, "sh", "-c", "true"], timeout=120, env=env
        )
    except BoincvmError as exc:
        lines = (getattr(exc, "stderr_tail", "") or exc.message).strip().splitlines()
        return lines[-1] if lines else exc.message
    return None


def _podman(p: Program, d: Path, env: dict[str, str], run: str) -> Sample:
    _stage(p, d)
    name = f"boincvm-peers-{os.getpid()}-{run}"
    argv = ["podman", "run", "--rm", "--name", name, "--network", "none", "-v", f"{d}:/work", "-w", "/work",
            TAG, *p.argv]  # fmt: skip
    t0 = time.perf_counter()
    child = proc.spawn(argv, env=env)
    with TreeSampler([child.pid], marker=name) as s:
        code, _cpu, _ = wait_rusage(child.pid, 600)
    wall = time.perf_counter() - t0
    child.returncode = code
    if code != 0:
        raise RuntimeError(f"podman {p.name} exited with {code}")
    return Sample(wall, s.peaks.cpu_seconds, s.peaks.peak_rss, (d / "out").read_bytes())


# -- the table ----------------------------------------------------------------------------
def _ratios(a: list[Sample], b: list[Sample], key: Callable[[Sample], float]) -> str:
    return spread([key(x) / max(key(y), 1e-9) for x, y in zip(a, b, strict=True)])


def _report(name: str, runs: dict[str, list[Sample]], loads: list[str]) -> None:
    nat, vm, pod = runs["native"], runs["boincvm"], runs.get("podman", [])
    print(f"  {name}: {len(vm)} pairs, load {min(loads)}-{max(loads)}")
    rows: tuple[tuple[str, Callable[[Sample], float], str], ...] = (
        ("wall s", lambda s: s.wall, "{:.3f}"),
        ("cpu s", lambda s: s.cpu, "{:.2f}"),
        ("mem MiB", lambda s: s.mem / MIB, "{:.1f}"),
    )
    for label, key, fmt in rows:
        med = {k: fmt.format(statistics.median(key(s) for s in v)) for k, v in runs.items() if v}
        line = f"    {label:8} native {med['native']:>7}  boincvm {med['boincvm']:>7}"
        line += f"  podman {med.get('podman', '-'):>7}  boincvm/native {_ratios(vm, nat, key)}"
        if pod:
            line += f"  boincvm/podman {_ratios(vm, pod, key)}"
        print(line)


def main(quick: bool = False) -> None:
    """Print the table (``quick``: 2 pairs and a shorter long job, else 5)."""
    pairs = 2 if quick else 5
    print(
        f"== bench_peers: native vs boincvm run-local vs podman, {pairs} alternating pairs (load {loadavg()})"
    )
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        root = Path(tmp)
        bindir = root / "bin"
        bindir.mkdir()
        for a in APPLETS:
            (bindir / a).symlink_to("/bin/busybox")
        conf = root / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        env = {"CONTAINERS_CONF": str(conf)}
        why_not = _podman_setup(root, env)
        if why_not:
            print(f"  podman: cannot run a container here ({why_not}); its columns are left out")
        av = root / "av"
        package_image(
            AppVersionRequest(
                image=build_guest_image("minimal"), app_name="peers", version="1.00", output_dir=av
            )
        )
        programs = _programs(root, quick)
        wus = {p.name: _boincvm_wu(p, root) for p in programs}
        _boincvm(wus["hello"], av, root, "warmup")  # builds the golden checkpoint: not counted
        every: dict[str, dict[str, list[Sample]]] = {}
        for p in programs:
            runs: dict[str, list[Sample]] = {"native": [], "boincvm": [], "podman": []}
            loads: list[str] = []
            for i in range(pairs):
                loads.append(loadavg())
                runs["native"].append(_native(p, root / f"n-{p.name}-{i}", bindir))
                runs["boincvm"].append(_boincvm(wus[p.name], av, root, f"{p.name}-{i}"))
                if not why_not:
                    runs["podman"].append(_podman(p, root / f"p-{p.name}-{i}", env, f"{p.name}-{i}"))
                outs = {k: v[-1].out for k, v in runs.items() if v}
                if len(set(outs.values())) != 1:
                    raise RuntimeError(f"{p.name}: the runtimes' outputs differ ({sorted(outs)})")
                for k in ("native", "podman"):
                    shutil.rmtree(root / f"{k[0]}-{p.name}-{i}", ignore_errors=True)
            _report(p.name, runs, loads)
            every[p.name] = runs
        # The copies of 100 MB in and out alone: move100MB's end-to-end time less hello's,
        # pair by pair (podman bind-mounts the directory: it copies nothing).
        moved, hellos = every["move100MB"]["boincvm"], every["hello"]["boincvm"]
        copies = [m.wall - h.wall for m, h in zip(moved, hellos, strict=True)]
        print(
            f"  100 MB in + 100 MB out, the copies alone (boincvm's move100MB less its hello, per pair):"
            f" {spread(copies)} s"
        )
        # The compute job's time in the guest: its end-to-end time less hello's (boot, copies).
        hello = statistics.median(s.wall for s in every["hello"]["boincvm"])
        comp = every["compute"]
        tcg = [(v.wall - hello) / n.wall for v, n in zip(comp["boincvm"], comp["native"], strict=True)]
        if tcg:
            print(
                f"  TCG compute slowdown (compute job's run time in the guest / native, boincvm's hello"
                f" overhead taken off): {spread(tcg)}x -- TCG's (software CPU emulation on this host),"
                " not the design's: under KVM the guest computes at about native speed"
            )


if __name__ == "__main__":
    main("--quick" in sys.argv)
