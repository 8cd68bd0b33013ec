"""The vm job's <vm_accel_required/>: parsed, merged, rendered, and checked against accel=tcg."""

from __future__ import annotations

from boincvm.findings import errors_in
from boincvm.job import BackendOption, Task, VmJob, parse_job, resolve, validate_job
from boincvm.job.render import render_job


def test_the_flag_parses_renders_and_resolves() -> None:
    job, findings = parse_job("<vm_job><vm_accel_required/><vm_image>d</vm_image></vm_job>")
    assert findings == []
    assert job.vm_accel_required is True
    again, _ = parse_job(render_job(job))
    assert again.vm_accel_required is True
    done = resolve(job.merged(VmJob(task=Task(application="/bin/true"))))
    assert done.vm_accel_required is True
    assert resolve(VmJob(vm_image="d", task=Task(application="/bin/true"))).vm_accel_required is False


def test_the_workunit_may_lift_the_app_versions_requirement() -> None:
    defaults = VmJob(vm_accel_required=True)
    assert defaults.merged(VmJob(vm_accel_required=False)).vm_accel_required is False
    assert defaults.merged(VmJob()).vm_accel_required is True


def test_required_kvm_with_forced_tcg_is_an_error() -> None:
    job = VmJob(vm_accel_required=True, backend_options=(BackendOption("accel", "tcg"),))
    (bad,) = errors_in(validate_job(job))
    assert bad.place == "vm_job.vm_accel_required"
    assert "accel=tcg" in bad.message


def test_a_bad_flag_value_is_named() -> None:
    _, findings = parse_job("<vm_job><vm_accel_required>maybe</vm_accel_required></vm_job>")
    assert [f.place for f in errors_in(findings)] == ["vm_job.vm_accel_required"]
