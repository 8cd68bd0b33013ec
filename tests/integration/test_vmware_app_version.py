"""A VMware app version end to end: package-image on a VM directory, then run-local with the stand-in vmrun.

The wrapper (the app version's own zip application, started by the client emulator)
resolves the VM's files through the slot's links, rebuilds the VM directory in the slot,
makes a linked clone of the shipped ``boincvm-base`` snapshot and runs the job through the
credential-free channel (guestinfo + shared folder + the guest agent). Nothing in the app
version, nor in the client's project directory, may change.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.appversion.build import package_image
from boincvm.appversion.check import check_app_version
from boincvm.appversion.model import AppVersionRequest
from boincvm.findings import has_errors
from boincvm.hashing import md5_file
from boincvm.hypervisor.vmware.backend import BASE_DIR
from boincvm.hypervisor.vmware.config import AGENT_SCRIPT
from boincvm.job import OutputFile, Task, VmJob
from boincvm.runlocal.emulator import run_local
from boincvm.runlocal.request import RunLocalRequest
from boincvm.workunit.make import InputSpec, WorkunitRequest, make_workunits
from boincvm.wrapper.steps import VM_DIR
from tests.fakes.vmware_vm import VM_FILES, make_vm
from tests.unit.test_vmware_backend import install_fake, stop_everything

pytestmark = pytest.mark.integration


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    install_fake(tmp_path / "bin", tmp_path / "state", monkeypatch)
    (tmp_path / "state" / "agent.sh").write_text(AGENT_SCRIPT)  # the image's boot service
    yield tmp_path / "state"
    stop_everything(tmp_path / "state")


def md5s(directory: Path) -> dict[str, tuple[str, int]]:
    return {p.name: md5_file(p) for p in sorted(directory.iterdir()) if p.is_file()}


def test_a_packaged_vm_runs_a_workunit_and_its_files_stay_untouched(tmp_path: Path, stand_in: Path) -> None:
    make_vm(tmp_path / "vm")
    av = tmp_path / "av"
    package_image(AppVersionRequest(image=tmp_path / "vm", app_name="vmapp", version="1.00", output_dir=av))
    assert not has_errors(check_app_version(av))
    shipped = md5s(av)

    (tmp_path / "world.txt").write_text("world\n")
    wu = tmp_path / "wu"
    make_workunits(
        WorkunitRequest(
            app_name="vmapp",
            job=VmJob(
                task=Task(application="/bin/sh"),
                output_files=(OutputFile("out", 100_000),),
                disable_automatic_checkpoints=True,
            ),
            output_dir=wu,
            inputs=(InputSpec("in", str(tmp_path / "world.txt")),),
            command_line='-c "tr a-z A-Z < in > out"',
        )
    )
    data_dir = tmp_path / "client"
    summary = run_local(
        RunLocalRequest(
            workunit_dir=wu,
            app_version_dir=av,
            results_dir=tmp_path / "results",
            data_dir=data_dir,
            timeout=120,
            keep_slot=True,
        )
    )
    assert summary.ok, summary.message + summary.stderr_tail
    assert (tmp_path / "results" / "out").read_text() == "WORLD\n"

    # Not one byte of the app version changed, here or in the client's project directory.
    assert md5s(av) == shipped
    (project,) = (data_dir / "projects").iterdir()
    installed = {name: value for name, value in shipped.items() if name.startswith("vmapp_1.00_")}
    # The VM, the wrapper (its launcher, the static wrapper and the wrapper's runtime), the job defaults.
    assert len(installed) == len(VM_FILES) + 4
    assert {name: md5_file(project / name) for name in installed} == installed

    # The slot holds the rebuilt VM directory: small files copied, the large ones linked to the project's.
    (slot,) = (p for p in (data_dir / "slots").iterdir() if (p / VM_DIR).is_dir())
    base = slot / VM_DIR / BASE_DIR
    assert {p.name for p in base.iterdir()} == set(VM_FILES)
    for name in ("base-s001.vmdk", "data.vmdk"):
        assert (base / name).is_symlink() and (base / name).resolve().parent == project.resolve()
    for name in ("base.vmx", "base.vmsd", "base.vmdk", "base.nvram"):
        assert not (base / name).is_symlink()
    # VMware's one write to a base VM, registering the linked clone, went to the slot's copy.
    assert "snapshot0.numClones" in (base / "base.vmsd").read_text()
    assert "snapshot0.numClones" not in next(av.glob("*_base.vmsd")).read_text()
    assert "rebuilt the base VM in base (9 files copied, 2 linked)" in (slot / "stderr.txt").read_text()
