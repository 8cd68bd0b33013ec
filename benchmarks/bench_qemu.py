"""QEMU backend figures: boot, golden start, checkpoints, file transfer (agent vs transfer disk).

Run: ``python benchmarks/bench_qemu.py`` (or through ``benchmarks/run.py``). Everything is
wall-clock on this host, under whatever accelerator the backend chose (printed first).

Measured under TCG on the 2-core development host, machine q35 (the default), quiet host:

* start to the guest agent's first answer: cold boot 1.7 s (min 1.67, max 2.1; about
  2.9 s on a slower host, where every figure here grows by 40-70 %); from the golden
  checkpoint 0.08 s, 0.17 s with the guest clock set (the first fork and exec after a
  restore: TCG translates the guest's code afresh);
* checkpoints of a 512 MiB guest with a running program: a RAM diff (VM started from
  its golden checkpoint) 0.016-0.021 s, 1.7 MB per checkpoint, restored in a new
  process 0.085 s (0.18 s with the clock set); snapshot-save (cold-booted VM)
  0.14-0.16 s, 69 MB per checkpoint, restored in a new process 0.24 s (0.32 s).

File transfer (MB/s, median of 3; agent 100 MB n=1; the guest side is /scratch, ext4 on
the qcow2 overlay; the guest's dd uses direct I/O on both ends)::

                    10 MB in  10 MB out  100 MB in  100 MB out
    agent (qemu-ga)      4.3       17.7        4.6        17.3
    disk, pc            24.6       31.3      192.8       148.9
    disk, q35           47.3       99.3      230.5       205.5

A plug + unplug costs about 1 s on pc (ACPI hot-plug under TCG) and about 0.25 s on q35,
which is why 10 MB files move at a fraction of the large-file rate.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from boincvm.hypervisor.qemu import ramdiff
from boincvm.hypervisor.qemu.backend import QemuBackend
from boincvm.image.descriptor import spec_for_image
from boincvm.image.guest import build_guest_image

RUNS = 3
XFER_SIZES = (10 * 10**6, 100 * 10**6)
GUEST_XFER = "/scratch/boincvm/xfer.bin"
#: The issue's goals for checkpoints are stated for a 512 MiB guest.
CHECKPOINT_MEMORY_MB = 512


def _median(fn: Callable[[], float], runs: int = RUNS) -> tuple[float, float, float]:
    xs = [fn() for _ in range(runs)]
    return min(xs), statistics.median(xs), max(xs)


def _row(label: str, figures: tuple[float, float, float], unit: str = "s", runs: int = RUNS) -> None:
    lo, med, hi = figures
    print(f"  {label:<44} median {med:7.3f} {unit}   (min {lo:.3f}, max {hi:.3f}, n={runs})")


def _size(path: Path) -> float:
    return path.stat().st_size / 1e6


def main() -> None:
    """Print the figures."""
    image = build_guest_image("minimal")
    with tempfile.TemporaryDirectory(prefix="bench-qemu-") as tmp:
        root = Path(tmp)
        counter = 0

        def backend(golden: str, memory_mb: int | None = None) -> QemuBackend:
            nonlocal counter
            counter += 1
            wd = root / f"vm{counter}"
            extra: dict[str, object] = {"options": {"golden": golden}}
            if memory_mb:
                extra["memory_mb"] = memory_mb
            return QemuBackend(spec_for_image(image, name=f"bench{counter}", workdir=wd, **extra))

        marks: dict[str, list[float]] = {}

        def start(golden: str) -> float:
            vm = backend(golden)
            try:
                vm.power_on()
                vm.wait_for_tools()
                for mark, took in vm.start_timings.items():
                    marks.setdefault(f"{golden}-{mark}", []).append(took)
                return vm.start_timings["agent"]
            finally:
                vm.power_off()

        def ready(golden: str) -> tuple[float, float, float]:
            xs = marks[f"{golden}-ready"]
            return min(xs), statistics.median(xs), max(xs)

        start("yes")  # builds the golden checkpoint once, untimed
        probe = backend("no")
        probe.power_on()
        print(f"qemu backend: accelerator {probe.accel.accel if probe.accel else '?'}")
        if probe.accel_note:
            print(f"  note: {probe.accel_note}")
        probe.power_off()

        marks.clear()
        print(f"start to guest agent answering (machine {probe.machine})")
        _row("cold boot (PVH vmlinux + initramfs)", _median(lambda: start("no"), 5), runs=5)
        _row("golden checkpoint (incoming migration)", _median(lambda: start("yes"), 5), runs=5)
        _row("golden checkpoint, guest clock set too", ready("yes"), runs=5)

        for kind, golden in (
            ("RAM diff, VM from its golden checkpoint", "yes"),
            ("snapshot-save, cold VM", "no"),
        ):
            checkpoints(kind, backend(golden, CHECKPOINT_MEMORY_MB), marks)

        transfers(image, root)


def checkpoints(kind: str, vm: QemuBackend, marks: dict[str, list[float]]) -> None:
    """Save, revert and restore figures of one kind of checkpoint (the VM decides which);
    for the snapshot-save kind also HMP savevm/loadvm and a plain migration to a file."""
    vm.power_on()  # a golden start builds its golden checkpoint first, untimed
    vm.wait_for_tools()
    vm.start_program(["/bin/sh", "-c", "i=0; while :; do i=$((i+1)); sleep 0.05; done"])
    overlay = vm.workdir / "disk.qcow2"
    print(f"checkpoints: {kind} ({CHECKPOINT_MEMORY_MB} MiB guest, live, with a running program)")
    names = iter(range(100))

    def stored() -> float:
        extra = vm.workdir / ramdiff.CHECKPOINTS
        files = [f for f in extra.rglob("*") if f.is_file()] if extra.is_dir() else []
        return _size(overlay) + sum(f.stat().st_size for f in files) / 1e6

    def save() -> float:
        t0 = time.monotonic()
        vm.snapshot_create(f"s{next(names)}")
        return time.monotonic() - t0

    before = stored()
    _row("checkpoint (snapshot_create)", _median(save))
    print(f"  {'bytes stored per checkpoint':<44} {(stored() - before) / RUNS:7.1f} MB")

    def revert() -> float:
        t0 = time.monotonic()
        vm.snapshot_revert("s0")
        return time.monotonic() - t0

    _row("revert (+ agent; a diff restarts QEMU)", _median(revert))
    if kind.startswith("snapshot-save"):

        def hmp(cmd: str) -> float:
            t0 = time.monotonic()
            out = vm.qmp("human-monitor-command", {"command-line": cmd}, timeout=300)
            assert not str(out).strip(), out
            return time.monotonic() - t0

        _row("HMP savevm", _median(lambda: hmp(f"savevm h{next(names)}")))
        _row("HMP loadvm", _median(lambda: hmp("loadvm s0")))
        mig = vm.workdir / "state.mig"

        def migrate() -> float:
            t0 = time.monotonic()
            vm.qmp("stop")
            vm.qmp("migrate-set-parameters", {"max-bandwidth": 16 * 1024**3})
            vm.qmp("migrate", {"uri": "exec:cat > state.mig"})
            while vm.qmp("query-migrate").get("status") not in ("completed", "failed"):
                time.sleep(0.005)
            took = time.monotonic() - t0
            vm.qmp("cont")
            return took

        _row("stop + migrate to a file (disk not included)", _median(migrate))
        print(f"  {'migration file size':<44} {_size(mig):7.1f} MB")
    vm.power_off()

    def restore_new_process() -> float:
        other = QemuBackend(vm.spec)
        try:
            other.power_on(snapshot="s0")
            marks.setdefault(f"{kind}-ready", []).append(other.start_timings["ready"])
            return other.start_timings["agent"]
        finally:
            other.power_off()

    _row("new process: power_on(snapshot=) to agent", _median(restore_new_process, 5), runs=5)
    xs = marks[f"{kind}-ready"]
    _row("new process: to agent, guest clock set too", (min(xs), statistics.median(xs), max(xs)), runs=5)


def transfers(image: Path, root: Path) -> None:
    """MB/s both ways for each size: the agent path against the transfer disk on pc and q35."""
    print("file transfer, MB/s (guest side: /scratch, ext4 on the qcow2 overlay)")
    print("  agent: guest-file-* in 4 MiB chunks; disk: hot-plugged raw virtio-blk, plug to unplug")
    src, back = root / "xfer.bin", root / "back.bin"
    paths = (
        ("agent", {"transfer_disk": "no"}),
        ("disk, pc", {"machine": "pc"}),
        ("disk, q35", {"machine": "q35"}),
    )
    for n, (label, options) in enumerate(paths):
        spec = spec_for_image(image, name=f"bench-xfer{n}", workdir=root / f"xfer{n}", options=options)
        with QemuBackend(spec) as vm:
            vm.power_on()
            vm.wait_for_tools()
            for size in XFER_SIZES:
                src.write_bytes(os.urandom(size))

                def push(vm: QemuBackend = vm, size: int = size) -> float:
                    t0 = time.monotonic()
                    vm.copy_to_guest(src, GUEST_XFER)
                    return size / 1e6 / (time.monotonic() - t0)

                def pull(vm: QemuBackend = vm, size: int = size) -> float:
                    t0 = time.monotonic()
                    vm.copy_from_guest(GUEST_XFER, back)
                    return size / 1e6 / (time.monotonic() - t0)

                runs = 1 if label == "agent" and size > 20 * 10**6 else RUNS  # 100 MB by agent: ~80 s
                mb = size // 10**6
                _row(f"{label}: {mb} MB host -> guest", _median(push, runs), "MB/s", runs)
                _row(f"{label}: {mb} MB guest -> host", _median(pull, runs), "MB/s", runs)
                vm.run_program(["rm", "-f", GUEST_XFER], timeout=60)


if __name__ == "__main__":
    main()
