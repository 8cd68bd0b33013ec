"""``boincvm package-image`` and ``validate`` on a VMware VM directory, as a user runs them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli.conftest import RunFn
from tests.fakes.vmware_vm import VM_FILES, make_vm


def test_package_a_vm_directory_then_validate_it(tmp_path: Path, run: RunFn) -> None:
    make_vm(tmp_path / "vm")
    out = tmp_path / "av"
    code, stdout, stderr = run(
        ["package-image", str(tmp_path / "vm"), "--app", "vmapp", "-o", str(out), "--json"]
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert {f["logical_name"] for f in summary["files"]} >= {f"vmware_{n}" for n in VM_FILES}
    assert "adding base-s001.vmdk (extent)" in stderr
    code, stdout, stderr = run(["validate", "--json", str(out)])
    assert code == 0, stderr
    (report,) = json.loads(stdout)
    assert report["kind"] == "app version" and report["valid"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda vm: (vm / "base.vmsd").unlink(), "no snapshots; the VM needs one named 'boincvm-base'"),
        (lambda vm: (vm / "base.vmx.lck").mkdir(), "the VM is in use"),
        (lambda vm: (vm / "base-s001.vmdk").unlink(), "extent file base-s001.vmdk does not exist"),
        (
            lambda vm: (vm / "base.vmx").write_text(
                (vm / "base.vmx").read_text().replace('"data-000001.vmdk"', '"../elsewhere/data-000001.vmdk"')
            ),
            "leaves the VM directory",
        ),
    ],
)
def test_refusals_exit_3_with_a_hint_and_leave_nothing(
    tmp_path: Path, run: RunFn, damage: Callable[[Path], object], message: str
) -> None:
    vm = tmp_path / "vm"
    make_vm(vm)
    damage(vm)
    code, stdout, stderr = run(
        ["package-image", str(vm / "base.vmx"), "--app", "vmapp", "-o", str(tmp_path / "av")]
    )
    assert code == 3
    assert stdout == ""
    assert message in " ".join(stderr.split())
    assert "hint:" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm"]
