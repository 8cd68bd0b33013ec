"""Backend options: in the vm job, checked by the backend that reads them, passed to the VM."""

from __future__ import annotations

import pytest

from boincvm.errors import InputError
from boincvm.hypervisor.qemu.options import DEFAULT_MACHINE, QemuOptions
from boincvm.job import BackendOption, Task, VmJob, parse_job, resolve, validate_job
from boincvm.job.render import render_job

OPTION_XML = (
    "<vm_job><backend_option><name>{}</name><value>{}</value></backend_option>"
    "<task><application>/bin/true</application></task><vm_image>d.qcow2</vm_image></vm_job>"
)


def errors(job: VmJob, *, complete: bool = False) -> list[str]:
    return [str(f) for f in validate_job(job, complete=complete) if f.severity.value == "error"]


def test_round_trip_and_resolve() -> None:
    job = VmJob(
        vm_image="d.qcow2",
        task=Task(application="/bin/true"),
        backend_options=(BackendOption("machine", "pc"), BackendOption("golden", "no")),
    )
    parsed, findings = parse_job(render_job(job))
    assert findings == [] and parsed == job
    assert resolve(parsed).backend_options == (("machine", "pc"), ("golden", "no"))


def test_workunit_options_merge_over_the_app_defaults_by_name() -> None:
    defaults = VmJob(backend_options=(BackendOption("machine", "pc"), BackendOption("golden", "no")))
    wu = VmJob(backend_options=(BackendOption("machine", "microvm"),))
    assert defaults.merged(wu).backend_options == (
        BackendOption("machine", "microvm"),
        BackendOption("golden", "no"),
    )
    assert defaults.merged(VmJob()).backend_options == defaults.backend_options


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("machine", "isapc", "vm_job.backend_option[0]: qemu: machine: must be one of pc, q35, microvm"),
        ("snapshot_timeout", "soon", "qemu: snapshot_timeout: must be a positive number of seconds"),
        ("Machine", "pc", "'Machine' is not an option name"),
        ("colour", "red", "qemu: colour: unknown QEMU option"),
    ],
)
def test_bad_options_are_errors_at_their_place(name: str, value: str, message: str) -> None:
    job, findings = parse_job(OPTION_XML.format(name, value))
    assert findings == []
    assert any(message in e for e in errors(job)), errors(job)
    with pytest.raises(Exception, match="the vm job is not complete"):
        resolve(job)


def test_an_option_must_suit_the_backend_that_reads_it() -> None:
    vmware_only = VmJob(backend_options=(BackendOption("guest_user", "boinc"),))
    assert errors(vmware_only) == []  # a workunit job: the app version's defaults name the backend
    assert any("qemu: guest_user: unknown QEMU option" in e for e in errors(vmware_only, complete=True))
    assert errors(VmJob(backend="vmware", backend_options=vmware_only.backend_options)) == []
    inline = VmJob(backend="vmware", backend_options=(BackendOption("guest_password", "secret"),))
    assert any("passwords are not accepted inline" in e for e in errors(inline))
    twice = VmJob(backend_options=(BackendOption("machine", "pc"), BackendOption("machine", "q35")))
    assert any("'machine' appears twice" in e for e in errors(twice))


def test_qemu_options_defaults_and_values() -> None:
    assert QemuOptions.from_options({}) == QemuOptions()
    assert QemuOptions().machine == DEFAULT_MACHINE == "q35"
    opts = QemuOptions.from_options(
        {"machine": "pc", "transfer_disk_min_bytes": "0", "snapshot_timeout": "9.5"}
    )
    assert (opts.machine, opts.transfer_disk_min_bytes, opts.snapshot_timeout) == ("pc", 0, 9.5)
    with pytest.raises(InputError, match="transfer_disk_min_bytes: must be a positive number of bytes"):
        QemuOptions.from_options({"transfer_disk_min_bytes": "-3"})
    with pytest.raises(InputError, match="golden: must be one of auto, yes, no"):
        QemuOptions.from_options({"golden": "maybe"})
