"""The bare, older volunteer host: Debian 11 (glibc 2.31) with only boinc-client 7.16.

Printed: how long the recipe of tests/bare_host.py takes to build the root file system
(mmdebstrap, fresh, not the cached one) and its size; then the same time-paced workunit
under the root's own 7.16 client (attach to report, in a copy of the cached root, against
the loopback project) and under run-local on this machine, and their ratio. Where the app
version cannot run on the bare host, the task's own reason is printed instead of the ratio.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boincvm import proc  # noqa: E402
from boincvm.appversion.build import package_image  # noqa: E402
from boincvm.appversion.model import AppVersionRequest  # noqa: E402
from boincvm.image.guest import build_guest_image  # noqa: E402
from boincvm.job import OutputFile, Task, VmJob  # noqa: E402
from boincvm.runlocal.emulator import run_local  # noqa: E402
from boincvm.runlocal.loopback import LoopbackProject  # noqa: E402
from boincvm.runlocal.real_client import Client  # noqa: E402
from boincvm.runlocal.request import RunLocalRequest  # noqa: E402
from boincvm.signing import write_key_pair  # noqa: E402
from boincvm.workunit.make import InputSpec, WorkunitRequest, make_workunits  # noqa: E402
from boincvm.workunit.templates import Resources  # noqa: E402
from tests.bare_host import BareHost, build_root, make_root  # noqa: E402

STEPS, STEP = 20, 1.0
LONGJOB = Path(__file__).resolve().parents[1] / "examples/longjob/program/bin/longjob"
#: Generous: the job is 20 s of guest time; TCG boots, downloads and checkpoints come on top.
TIMEOUT = 600.0


def _size_mb(root: Path) -> float:
    return int(proc.run(["du", "-s", "--block-size=1", str(root)], timeout=120).text.split()[0]) / 1e6


def _rootfs(work: Path) -> None:
    t0 = time.perf_counter()
    make_root(work / "fresh")
    took = time.perf_counter() - t0
    print(
        f"== bench_bare_host: Debian 11 root (mmdebstrap, python purged) {took:.1f} s, "
        f"{_size_mb(work / 'fresh'):.0f} MB on disk"
    )
    proc.run(["rm", "-rf", str(work / "fresh")], timeout=120)


def _bare_run(
    host: BareHost, av: Path, public: Path, wu: Path, name: str
) -> tuple[float, bytes | None, str | None]:
    """Seconds from attach to report under the bare host's client, the upload, and the failure if any."""
    project = LoopbackProject(av, wu, public).start()
    client = Client(host.data_dir(name), project, checkpoint_period=STEPS * STEP / 5, launcher=host.launcher)
    t0 = time.perf_counter()
    client.start()
    try:
        while not project.seen.reports and time.perf_counter() - t0 < TIMEOUT:
            if "error" in client.tasks().get("state", "").lower():
                client.cmd("--project", project.url, "update")  # report the failure now, not in 2 min
            time.sleep(0.5)
    finally:
        client.stop()
        project.stop()
    took = time.perf_counter() - t0
    if not project.seen.reports:
        return took, None, f"no report within {TIMEOUT:g} s"
    report = project.seen.reports[-1]
    if "<exit_status>0</exit_status>" in report and project.seen.uploads:
        (data,) = project.seen.uploads.values()
        return took, data, None
    found = re.search(r"<stderr_txt>\s*(.*?)\s*</stderr_txt>", report, re.S)
    return took, None, (found.group(1).splitlines() or ["(empty stderr)"])[-1] if found else "no stderr_txt"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-bare-") as tmp:
        work = Path(tmp)
        _rootfs(work)
        host = BareHost.copy_of(build_root(), work / "root")
        _, public = write_key_pair(work / "keys")
        av = work / "av"
        package_image(
            AppVersionRequest(
                image=build_guest_image("minimal"),
                app_name="benchbare",
                version="1.00",
                output_dir=av,
                sign_key=work / "keys/code_sign_private",
            )
        )
        wu = work / "wu"
        make_workunits(
            WorkunitRequest(
                app_name="benchbare",
                job=VmJob(
                    task=Task(
                        application="/bin/sh",
                        fraction_done_filename="fraction_done",
                        credit_report_filename="credit_report",
                    ),
                    output_files=(OutputFile("out", 100_000),),
                    minimum_checkpoint_interval=0,
                ),
                output_dir=wu,
                inputs=(InputSpec("longjob.sh", str(LONGJOB)),),
                command_line=f"longjob.sh {STEPS} {STEP} 0 sleep",
                resources=Resources(rsc_memory_bound=1e9),
            )
        )
        bare, upload, failure = _bare_run(host, av, public, wu, "bench")
        t0 = time.perf_counter()
        local = run_local(
            RunLocalRequest(
                workunit_dir=wu,
                app_version_dir=av,
                results_dir=work / "local",
                data_dir=work / "d",
                checkpoint_period=STEPS * STEP / 5,
            )
        )
        local_s = time.perf_counter() - t0
        assert local.ok, local.message
        print(f"   run-local on this machine: {local_s:.1f} s for a {STEPS * STEP:.0f} s job")
        if failure is not None:
            print(f"   bare host (client 7.16): the task failed after {bare:.1f} s: {failure}")
            return
        assert upload == (work / "local/out").read_bytes(), "the bare host's result differs from run-local's"
        print(
            f"   bare host (client 7.16, attach to report): {bare:.1f} s; "
            f"ratio bare host / run-local {bare / local_s:.2f}"
        )


if __name__ == "__main__":
    main()
