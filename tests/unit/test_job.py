"""The vm job model: parse -> validate -> render round trips, escaping, hostile XML."""

from __future__ import annotations

from pathlib import Path

import pytest

from boincvm.errors import XmlError
from boincvm.job import (
    CpuTimeSource,
    InputFile,
    OutputFile,
    Package,
    PackageKind,
    Task,
    VmJob,
    load_job,
    parse_job,
    resolve,
    validate_job,
)
from boincvm.job.render import render_job

GOLDEN = Path(__file__).parent / "golden"

FULL = VmJob(
    backend="qemu",
    vm_kernel="vm_kernel",
    vm_initrd="vm_initrd",
    vm_image="vm_disk.qcow2",
    kernel_cmdline="console=ttyS0 quiet",
    memory_mb=256,
    ncpus=2,
    enable_network=False,
    minimum_checkpoint_interval=60.5,
    disable_automatic_checkpoints=False,
    boot_timeout=30,
    cpu_time_source=CpuTimeSource.GUEST,
    package=Package("package.rpm", PackageKind.RPM),
    task=Task(
        application="/opt/hello/bin/hello",
        command_line='--greeting "a & b" <x>',
        exec_dir="/scratch/work",
        setenv=("LANG=C", "N=1"),
        fraction_done_filename="fraction_done",
        credit_report_filename="/tmp/creditreport",
        completion_trigger_file="done",
        temporary_exit_trigger_file="later",
        time_limit=3600,
    ),
    input_files=(InputFile("in"), InputFile("données.bin", "data/données.bin")),
    output_files=(OutputFile("out", 1_000_000), OutputFile("log", 5000, "logs/run.log", optional=True)),
)


def test_round_trip_full_job() -> None:
    xml = render_job(FULL)
    job, findings = parse_job(xml)
    assert findings == []
    assert job == FULL
    assert render_job(job) == xml


def test_render_matches_golden_file() -> None:
    assert render_job(FULL) == (GOLDEN / "vm_job_full.xml").read_text(encoding="utf-8")


def test_empty_job_round_trips() -> None:
    assert parse_job(render_job(VmJob()))[0] == VmJob()


def test_special_characters_are_escaped_for_boinc() -> None:
    xml = render_job(FULL)
    assert '<command_line>--greeting "a &amp; b" &lt;x&gt;</command_line>' in xml
    assert "données.bin" in xml


def test_unknown_elements_are_warnings_and_bad_numbers_errors() -> None:
    job, findings = parse_job("<vm_job><memry>1</memry><ncpus>two</ncpus></vm_job>")
    places = {(f.place, f.severity.value) for f in findings}
    assert ("vm_job.memry", "warning") in places
    assert ("vm_job.ncpus", "error") in places
    assert job.ncpus is None


def test_boinc_flag_semantics() -> None:
    job, _ = parse_job(
        "<vm_job><enable_network/><disable_automatic_checkpoints>0</disable_automatic_checkpoints></vm_job>"
    )
    assert job.enable_network is True
    assert job.disable_automatic_checkpoints is False


def test_empty_application_names_its_place() -> None:
    job, _ = parse_job(
        "<vm_job><vm_image>d.qcow2</vm_image><task><application></application></task></vm_job>"
    )
    findings = validate_job(job, complete=True)
    assert "vm_job.task.application: must not be empty" in [str(f) for f in findings]


@pytest.mark.parametrize(
    ("xml", "place"),
    [
        (
            "<vm_job><output_file><open_name>out</open_name></output_file></vm_job>",
            "vm_job.output_file[0].max_nbytes",
        ),
        (
            "<vm_job><input_file><open_name>../x</open_name></input_file></vm_job>",
            "vm_job.input_file[0].open_name",
        ),
        (
            "<vm_job><input_file><open_name>/etc/passwd</open_name></input_file></vm_job>",
            "vm_job.input_file[0].open_name",
        ),
        (
            "<vm_job><output_file><open_name>o</open_name><guest_name>../../etc/x</guest_name>"
            "<max_nbytes>1</max_nbytes></output_file></vm_job>",
            "vm_job.output_file[0].guest_name",
        ),
        (
            "<vm_job><output_file><open_name>o</open_name><guest_name>/etc/shadow</guest_name>"
            "<max_nbytes>1</max_nbytes></output_file></vm_job>",
            "vm_job.output_file[0].guest_name",
        ),
        (
            "<vm_job><input_file><open_name>a</open_name></input_file><input_file><open_name>a</open_name>"
            "</input_file></vm_job>",
            "vm_job.input_file[1].open_name",
        ),
        ("<vm_job><vm_image>../../img</vm_image></vm_job>", "vm_job.vm_image"),
        ("<vm_job><memory_size_mb>4</memory_size_mb></vm_job>", "vm_job.memory_size_mb"),
        ("<vm_job><task><exec_dir>rel</exec_dir></task></vm_job>", "vm_job.task.exec_dir"),
        ("<vm_job><task><setenv>NOEQUALS</setenv></task></vm_job>", "vm_job.task.setenv[0]"),
    ],
)
def test_invalid_values_are_found_at_their_place(xml: str, place: str) -> None:
    job, findings = parse_job(xml)
    findings += validate_job(job)
    assert place in [f.place for f in findings if f.severity.value == "error"], findings


def test_xxe_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOP SECRET")
    doc = f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]><vm_job><backend>&x;</backend></vm_job>'
    with pytest.raises(XmlError, match="DTD"):
        parse_job(doc)


def test_billion_laughs_is_refused() -> None:
    entities = ['<!ENTITY l0 "lol">'] + [f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10)]
    lol = "".join(entities)
    doc = f"<!DOCTYPE vm_job [{lol}]><vm_job><backend>&l9;</backend></vm_job>"
    with pytest.raises(XmlError):
        parse_job(doc)


def test_malformed_xml_names_line_and_hint() -> None:
    with pytest.raises(XmlError) as info:
        parse_job("<vm_job>\n<task><command_line>a & b</command_line></task></vm_job>")
    assert "line 2" in info.value.message
    assert info.value.hint and "&amp;" in info.value.hint


def test_wrong_root_is_refused() -> None:
    with pytest.raises(XmlError, match="expected <vm_job>"):
        parse_job("<job_desc/>")


def test_merge_workunit_job_over_app_defaults() -> None:
    defaults = VmJob(
        vm_kernel="k",
        memory_mb=256,
        task=Task(exec_dir="/scratch/w", application="/bin/true"),
        output_files=(OutputFile("x", 1),),
    )
    wu = VmJob(
        memory_mb=512,
        task=Task(application="/opt/p", command_line="-n 3"),
        output_files=(OutputFile("out", 10),),
    )
    merged = defaults.merged(wu)
    assert merged.vm_kernel == "k"
    assert merged.memory_mb == 512
    assert merged.task == Task(application="/opt/p", command_line="-n 3", exec_dir="/scratch/w")
    assert merged.output_files == (OutputFile("out", 10),)
    r = resolve(merged)
    assert r.exec_dir == "/scratch/w"
    assert r.guest_path("out") == "/scratch/w/out"
    assert r.guest_path("/abs/x") == "/abs/x"
    assert r.enable_network is False


def test_resolve_refuses_incomplete_job() -> None:
    with pytest.raises(XmlError, match="task.application"):
        resolve(VmJob(vm_image="x.qcow2"))


def test_load_job_errors_are_clear(tmp_path: Path) -> None:
    from boincvm.errors import InputError

    with pytest.raises(InputError, match="does not exist"):
        load_job(tmp_path / "nope.xml")
    bad = tmp_path / "bad.xml"
    bad.write_text("<vm_job><ncpus>x</ncpus></vm_job>")
    with pytest.raises(XmlError, match="vm_job.ncpus"):
        load_job(bad)
