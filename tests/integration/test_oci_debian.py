"""A Debian-based container image (root file system from ``mmdebstrap --format=tar``, layered
with umoci) whose program is a Python script run by the image's own ``python3``: a real
dynamic userland in the container root. Killed after its first committed checkpoint, it
resumes from it with a byte-identical result.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest, app_version_defaults
from boincvm.image.container import build_container_image
from boincvm.job import OutputFile, Task, VmJob
from boincvm.runlocal.emulator import run_local
from boincvm.runlocal.faults import Fault, FaultKind
from boincvm.runlocal.request import RunLocalRequest
from boincvm.workunit.make import WorkunitRequest, make_workunits
from boincvm.workunit.templates import Resources
from tests.integration.jobs import SCALE, bound, task_log
from tests.oci_images import M, debian_rootfs_tar, layer_tar, umoci_layout

pytestmark = pytest.mark.integration

#: Time-paced steps on the guest's clock, as examples/longjob does, in Python.
JOB = b"""import sys, time, platform
steps, step = int(sys.argv[1]), float(sys.argv[2])
with open("out", "w") as out:
    out.write(f"python {platform.python_version()}\\n")
total = 0
for i in range(1, steps + 1):
    time.sleep(step)
    total += i
    with open("out", "a") as out:
        out.write(f"step {i}\\n")
    with open("fraction_done", "w") as f:
        f.write(f"{i / steps:.4f}\\n")
with open("out", "a") as out:
    out.write(f"sum {total}\\n")
"""
STEPS = 20


@pytest.fixture(scope="module")
def debian_app_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("oci-debian")
    root = debian_rootfs_tar()
    with tarfile.open(root) as tar:  # the root as mmdebstrap makes it: device nodes and all
        assert any(m.ischr() for m in tar.getmembers()), "mmdebstrap's root has no device node"
    layout = umoci_layout(
        work / "layout",
        root,
        "--config.entrypoint=/usr/bin/python3",
        "--config.cmd=/app/job.py",
        "--config.workingdir=/app",
    )
    job_layer = work / "job.tar"
    job_layer.write_bytes(layer_tar([M("app", "dir", mode=0o755), M("app/job.py", data=JOB)]))
    subprocess.run(
        ["umoci", "raw", "add-layer", "--image", f"{layout}:latest", str(job_layer)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    image = build_container_image(layout, output=work / "image")  # umoci's layout is new each run
    out = work / "av"
    package_image(AppVersionRequest(image=image, app_name="ocideb", version="1.00", output_dir=out))
    return out


@pytest.mark.parametrize("kind", [FaultKind.KILL, FaultKind.QUIT])
def test_debian_python_image_resumes_byte_identical(
    debian_app_version: Path, tmp_path: Path, kind: FaultKind
) -> None:
    step = 1.0 * SCALE
    job = VmJob(
        task=Task(fraction_done_filename="fraction_done"),
        output_files=(OutputFile("out", 100_000),),
        minimum_checkpoint_interval=0,
    )
    wu = tmp_path / "wu"
    make_workunits(
        WorkunitRequest(
            app_name="ocideb",
            job=job,
            output_dir=wu,
            command_line=f"/app/job.py {STEPS} {step:.3f}",  # replaces the Cmd
            resources=Resources(rsc_memory_bound=1e9),
            defaults=app_version_defaults(debian_app_version),
        )
    )
    summary = run_local(
        RunLocalRequest(
            workunit_dir=wu,
            app_version_dir=debian_app_version,
            results_dir=tmp_path / "results",
            data_dir=tmp_path / "client",
            faults=(Fault.parse(kind, "checkpoint:1"),),
            timeout=bound(300),
            checkpoint_period=max(1.0, STEPS * step / 6),
        )
    )
    assert summary.ok, summary.message + summary.stderr_tail
    assert summary.starts == 2 and "resuming from checkpoint" in task_log(summary)
    out = (tmp_path / "results/out").read_text()
    assert out.startswith("python 3.11")
    steps = range(1, STEPS + 1)
    assert out.split("\n", 1)[1] == "".join(f"step {i}\n" for i in steps) + f"sum {sum(steps)}\n"
