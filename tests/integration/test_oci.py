"""Container images as boincvm guests, end to end under run-local: a ``FROM scratch`` image made
with umoci, built by ``build-image --from-oci`` (cached by content), packaged, and run with a
SIGKILL or a quit (preemption) after the first committed checkpoint; the second start resumes from it and the
result is byte for byte the uninterrupted one.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest, app_version_defaults
from boincvm.image.container import build_container_image
from boincvm.job import OutputFile, Task, VmJob
from boincvm.runlocal.emulator import run_local
from boincvm.runlocal.faults import Fault, FaultKind
from boincvm.runlocal.request import RunLocalRequest, RunSummary
from boincvm.workunit.make import WorkunitRequest, make_workunits
from boincvm.workunit.templates import Resources
from tests.integration.jobs import LongJob, bound, task_log
from tests.oci_images import M, busybox_members, layer_tar, umoci_layout

pytestmark = pytest.mark.integration

#: The image's program: who and where it runs, then the long job with its arguments.
RUN = b"""#!/bin/sh
id -u > whoami
id -g >> whoami
pwd >> whoami
echo "$GREETING" >> whoami
echo "running as $(id -u) in $(pwd)"
exec /bin/sh /app/longjob "$@"
"""
DEFAULT = LongJob(steps=3, step_seconds=0.2)
FAULTED = LongJob(steps=20)


@pytest.fixture(scope="module")
def scratch_app_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("oci")
    layer = work / "layer.tar"
    layer.write_bytes(layer_tar([*busybox_members(), M("app/run", data=RUN, mode=0o755)]))
    layout = umoci_layout(
        work / "layout",
        layer,
        "--config.entrypoint=/bin/sh",
        "--config.entrypoint=/app/run",
        *(f"--config.cmd={w}" for w in DEFAULT.command_line.split()[1:]),
        "--config.workingdir=/work",
        "--config.user=1000:1000",
        "--config.env=PATH=/bin",
        "--config.env=GREETING=hello from the image",
    )
    image = build_container_image(layout, output=work / "image")  # umoci's layout is new each run
    out = work / "av"
    package_image(AppVersionRequest(image=image, app_name="ocitest", version="1.00", output_dir=out))
    return out


def _workunit(tmp_path: Path, app_version: Path, command_line: str) -> Path:
    job = VmJob(
        task=Task(fraction_done_filename="fraction_done", credit_report_filename="credit_report"),
        output_files=(OutputFile("out", 100_000), OutputFile("whoami", 1000)),
        minimum_checkpoint_interval=0,
    )
    wu = tmp_path / "wu"
    make_workunits(
        WorkunitRequest(
            app_name="ocitest",
            job=job,
            output_dir=wu,
            command_line=command_line,
            resources=Resources(rsc_memory_bound=1e9),
            defaults=app_version_defaults(app_version),
        )
    )
    return wu


def _run(tmp_path: Path, wu: Path, app_version: Path, *faults: Fault) -> RunSummary:
    return run_local(
        RunLocalRequest(
            workunit_dir=wu,
            app_version_dir=app_version,
            results_dir=tmp_path / "results",
            data_dir=tmp_path / "client",
            faults=faults,
            timeout=bound(240),
            checkpoint_period=max(1.0, FAULTED.seconds / 6),
        )
    )


def _output_tail(summary: RunSummary) -> list[str]:
    """The program's output the wrapper logged at the end: the launcher outside the container
    root sent it to the wrapper's file (else its complaint would be there too)."""
    _, header, after = task_log(summary).partition("guest program output (tail):\n")
    assert header, task_log(summary)
    return list(itertools.takewhile(lambda line: " boincvm: " not in line, after.splitlines()))


def test_scratch_image_runs_cmd_as_its_user_in_its_workdir(scratch_app_version: Path, tmp_path: Path) -> None:
    summary = _run(tmp_path, _workunit(tmp_path, scratch_app_version, ""), scratch_app_version)
    assert summary.ok, summary.message + summary.stderr_tail
    assert (tmp_path / "results/out").read_text() == DEFAULT.expected_out
    assert (tmp_path / "results/whoami").read_text() == "1000\n1000\n/work\nhello from the image\n"
    assert _output_tail(summary) == ["running as 1000 in /work"]


@pytest.mark.parametrize("kind", [FaultKind.KILL, FaultKind.QUIT])
def test_scratch_image_interrupted_after_a_checkpoint_resumes_byte_identical(
    scratch_app_version: Path, tmp_path: Path, kind: FaultKind
) -> None:
    args = " ".join(FAULTED.command_line.split()[1:])  # replaces the image's Cmd
    wu = _workunit(tmp_path, scratch_app_version, args)
    summary = _run(tmp_path, wu, scratch_app_version, Fault.parse(kind, "checkpoint:1"))
    assert summary.ok, summary.message + summary.stderr_tail
    assert summary.starts == 2, summary.events
    assert any(f"injected {kind.value}" in e for e in summary.events), summary.events
    assert "resuming from checkpoint" in task_log(summary)
    assert (tmp_path / "results/out").read_text() == FAULTED.expected_out
    # The output file is in the VM: restored with it, and the program's line is still there.
    assert _output_tail(summary) == ["running as 1000 in /work"]
