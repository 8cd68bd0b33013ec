"""A container image under BUDA's runtime (``podman run``) and under boincvm, side by side.

The same ``FROM scratch`` image (made with umoci, as tests/oci_images.py does) and the same
time-paced job run uninterrupted, then killed at 50 % and restarted: podman starts the
container from zero again, boincvm resumes from its last checkpoint. Printed: wall times,
their ratio, and the job time each loses to the kill. Where podman cannot run a container
on this machine, the reason is printed instead of its figures.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boincvm import proc  # noqa: E402
from boincvm.appversion.build import package_image  # noqa: E402
from boincvm.appversion.model import AppVersionRequest, app_version_defaults  # noqa: E402
from boincvm.errors import CommandFailed, CommandNotFound  # noqa: E402
from boincvm.image.container import build_container_image  # noqa: E402
from boincvm.job import OutputFile, Task, VmJob  # noqa: E402
from boincvm.runlocal.emulator import run_local  # noqa: E402
from boincvm.runlocal.faults import Fault, FaultKind  # noqa: E402
from boincvm.runlocal.request import RunLocalRequest  # noqa: E402
from boincvm.workunit.make import WorkunitRequest, make_workunits  # noqa: E402
from boincvm.workunit.templates import Resources  # noqa: E402
from tests.oci_images import M, busybox_members, layer_tar, umoci_layout  # noqa: E402

STEPS, STEP = 20, 1.0
ARGS = f"{STEPS} {STEP} 0 sleep"


def _image(work: Path) -> Path:
    layer = work / "layer.tar"
    layer.write_bytes(layer_tar([*busybox_members(user=(0, 0)), M("tmp", "dir", mode=0o1777)]))
    return umoci_layout(
        work / "layout",
        layer,
        "--config.entrypoint=/bin/sh",
        "--config.entrypoint=/app/longjob",
        "--config.workingdir=/work",
        "--config.env=PATH=/bin",
    )


#: What lets podman start a container on a host like ours (itself a VM with cgroup v1 and a
#: fixed RLIMIT_NOFILE): no default ulimits (crun's setrlimit is refused otherwise) and
#: Debian's runc, since crun refuses cgroup v1 hybrid mode.
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n'


def _podman(layout: Path, work: Path) -> tuple[float, float] | None:
    """Seconds ``podman run`` took for the job uninterrupted and with a kill at 50 % and a
    restart (from zero: the container keeps nothing), or None (the reason printed)."""
    tag = "localhost/boincvm-bench-oci:latest"
    conf = work / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {"CONTAINERS_CONF": str(conf)}
    run = ["podman", "run", "--rm", "--name", "boincvm-bench-oci", tag, *ARGS.split()]
    try:
        proc.run(["skopeo", "copy", "-q", f"oci:{layout}:latest", f"containers-storage:{tag}"], timeout=300)
        t0 = time.perf_counter()
        proc.run(run, timeout=600, env=env)
        plain = time.perf_counter() - t0
        # The kill: the job is paced by time, so half its length is 50 % done.
        t0 = time.perf_counter()
        try:
            proc.run(run, timeout=STEPS * STEP / 2, env=env)
        except CommandFailed as exc:
            if exc.returncode is not None:
                raise
        proc.run(["podman", "rm", "-f", "boincvm-bench-oci"], timeout=60, check=False, env=env)
        proc.run(run, timeout=600, env=env)
        killed = time.perf_counter() - t0
    except (CommandNotFound, CommandFailed) as exc:
        reason = (getattr(exc, "stderr_tail", "") or exc.message).strip().splitlines()
        print(f"   podman: cannot run a container here: {reason[-1] if reason else exc.message}")
        print("   podman: a kill at 50 % restarts the container from zero: it loses 50 % of the job")
        return None
    print(f"   podman run: {plain:.1f} s for a {STEPS * STEP:.0f} s job (runc, no default ulimits)")
    print(
        f"   podman killed at 50 %: {killed:.1f} s in all, {killed - plain:.1f} s more than"
        " uninterrupted (it starts again from zero)"
    )
    return plain, killed


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-oci-") as tmp:
        work = Path(tmp)
        layout = _image(work)
        t0 = time.perf_counter()
        image = build_container_image(layout)
        print(f"== bench_oci: build-image --from-oci {time.perf_counter() - t0:.1f} s (cached by content)")
        av = work / "av"
        package_image(AppVersionRequest(image=image, app_name="benchoci", version="1.00", output_dir=av))
        job = VmJob(
            task=Task(fraction_done_filename="fraction_done", credit_report_filename="credit_report"),
            output_files=(OutputFile("out", 100_000),),
            minimum_checkpoint_interval=0,
        )
        results = {}
        for tag, faults in (("plain", ()), ("killed", (Fault.parse(FaultKind.KILL, "progress:0.5"),))):
            wu = work / f"wu-{tag}"
            make_workunits(
                WorkunitRequest(
                    app_name="benchoci",
                    job=job,
                    output_dir=wu,
                    command_line=ARGS,
                    resources=Resources(rsc_memory_bound=1e9),
                    defaults=app_version_defaults(av),
                )
            )
            t0 = time.perf_counter()
            summary = run_local(
                RunLocalRequest(
                    workunit_dir=wu,
                    app_version_dir=av,
                    results_dir=work / f"res-{tag}",
                    data_dir=work / f"client-{tag}",
                    faults=faults,
                    timeout=600,
                    checkpoint_period=STEPS * STEP / 5,
                )
            )
            results[tag] = (time.perf_counter() - t0, summary)
            assert summary.ok, summary.message
        plain, _ = results["plain"]
        killed, _ = results["killed"]
        print(
            f"   boincvm run-local: {plain:.1f} s for a {STEPS * STEP:.0f} s job "
            "(boot and checkpoints included)"
        )
        print(
            f"   boincvm killed at 50 %: {killed:.1f} s in all, "
            f"{killed - plain:.1f} s more than uninterrupted"
        )
        print(
            f"   (work lost is at most one checkpoint period, {STEPS * STEP / 5:.0f} s here, plus a restart)"
        )
        pod = _podman(layout, work)
        if pod:
            print(
                f"   ratio boincvm / podman: uninterrupted {plain / pod[0]:.2f},"
                f" killed at 50 % {killed / pod[1]:.2f}"
            )


if __name__ == "__main__":
    main()
