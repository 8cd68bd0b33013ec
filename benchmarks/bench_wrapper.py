"""The wrapper's start-up, frozen executable against zip application, and the app version's size.

Each run starts the app version's own main program in a fresh slot through the client
emulator (init_data.xml, shared memory, heartbeats once per poll) and times, from the
process start: the first heartbeat the wrapper read (the client could deliver a second
one). The wrapper is then killed (its VM has not got far). Its first status message goes
one second after its start, as BOINC's API sends it, so it is not timed. Runs of the two
forms alternate, so a busy host slows both alike.

Each form has one client data directory, as a host has: the first start of the frozen
form runs the static wrapper, which unpacks the wrapper's runtime beside the launcher
(timed apart, as "first start on a host"); the timed starts after it run the runtime.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from boincvm.appversion.build import package_image
from boincvm.appversion.model import WRAPPER_FILE_NAMES, AppVersion, AppVersionRequest, WrapperKind
from boincvm.boinc.client import ClientOptions, LocalClient
from boincvm.image.guest import build_guest_image
from boincvm.job import OutputFile, Task, VmJob
from boincvm.runlocal.request import RunLocalRequest
from boincvm.runlocal.task import build_task
from boincvm.unpacked import MANIFEST, WRAPPER
from boincvm.workunit.make import WorkunitRequest, make_workunits
from boincvm.workunit.templates import Resources

RUNS = 7
POLL = 0.002
TIMEOUT = 60.0


def _wu(root: Path) -> Path:
    task = Task(application="/bin/sh")
    out = root / "wu"
    make_workunits(
        WorkunitRequest(
            app_name="bench",
            job=VmJob(task=task, output_files=(OutputFile("out", 1_000_000),)),
            output_dir=out,
            command_line="-c 'echo hi > out'",
            resources=Resources(rsc_memory_bound=1e9),
        )
    )
    return out


def _unpacked(client: LocalClient) -> bool:
    return any(client.project_dir.glob(f"{WRAPPER.prefix}*/{MANIFEST}"))


def _start_once(root: Path, wu: Path, av: Path, run: int, *, first: bool = False) -> float:
    """Seconds from the start to the first heartbeat read.
    The ``first`` start on the host waits, before the kill, until the wrapper's runtime is unpacked."""
    data = root / f"client-{av.name}"
    task = build_task(RunLocalRequest(workunit_dir=wu, app_version_dir=av, results_dir=root, data_dir=data))
    heartbeat = None
    with LocalClient(data, task, slot=run + 1, options=ClientOptions(clean_slot=False)) as client:
        client.start()
        t0 = time.perf_counter()
        while heartbeat is None:
            if client.poll() is not None:
                raise RuntimeError(f"the wrapper exited during start-up: {client.status}")
            now = time.perf_counter() - t0
            s = client.status
            # The second heartbeat goes in only once the wrapper has read the first.
            if heartbeat is None and s.heartbeats_sent >= 2:
                heartbeat = now
            if now > TIMEOUT:
                raise RuntimeError("no heartbeat read within a minute")
            time.sleep(POLL)
        frozen = any(
            f.main_program and f.name.endswith(WRAPPER_FILE_NAMES[WrapperKind.FROZEN]) for f in task.app_files
        )
        while first and frozen and not _unpacked(client):
            if client.poll() is not None or time.perf_counter() - t0 > TIMEOUT:
                raise RuntimeError(f"the wrapper's runtime was not unpacked within a minute: {client.status}")
            time.sleep(0.05)
        client.kill()
        client.wait(30)
    return heartbeat


def _fmt(values: list[float]) -> str:
    return f"{min(values):6.3f} {statistics.median(values):6.3f} {max(values):6.3f}"


def _size(av: AppVersion) -> tuple[int, int]:
    main = next(f for f in av.files if f.main_program)
    return main.nbytes, sum(f.nbytes for f in av.files)


def main() -> None:
    """Print min/median/max start-up times of both forms, their ratio and the app version sizes."""
    print(f"== wrapper start-up, frozen ELF vs zip application ({RUNS} runs each, alternating)")
    image = build_guest_image("minimal")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        avs: dict[WrapperKind, Path] = {}
        sizes: dict[WrapperKind, tuple[int, int]] = {}
        for kind in WrapperKind:
            t0 = time.perf_counter()
            out = root / f"av-{kind.value}"
            req = AppVersionRequest(image=image, app_name="bench", version="1", output_dir=out, wrapper=kind)
            sizes[kind] = _size(package_image(req))
            avs[kind] = out
            took = time.perf_counter() - t0
            print(f"  package-image --wrapper {kind.value}: {took:5.1f} s")
        wu = _wu(root)
        times: dict[WrapperKind, list[float]] = {k: [] for k in WrapperKind}
        firsts = {kind: _start_once(root, wu, avs[kind], -1, first=True) for kind in WrapperKind}
        for run in range(RUNS):
            for kind in WrapperKind:
                times[kind].append(_start_once(root, wu, avs[kind], run))
        for kind, hb in firsts.items():
            print(f"  {kind.value:6} first start on a host: heartbeat read {hb:6.3f} s")
        print("                                 min    median max (s)")
        for kind in WrapperKind:
            print(f"  {kind.value:6} first heartbeat read: {_fmt(times[kind])}")
        frozen, pyz = (statistics.median(times[k]) for k in (WrapperKind.FROZEN, WrapperKind.PYZ))
        print(f"  ratio frozen/pyz, median first heartbeat read: {frozen / pyz:.2f}")
        for kind in WrapperKind:
            main_bytes, total = sizes[kind]
            print(
                f"  app version with {kind.value:6}: {total / 1e6:6.1f} MB "
                f"(main program {main_bytes / 1e6:5.2f} MB)"
            )


if __name__ == "__main__":
    main()
