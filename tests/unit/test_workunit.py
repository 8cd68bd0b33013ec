"""make_workunits: generated templates, staging by content, batches, atomicity, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boincvm.errors import InputError
from boincvm.hashing import md5_file
from boincvm.job import OutputFile, Task, VmJob, parse_job
from boincvm.validate import PathKind, check_workunit_dir, validate_path
from boincvm.workunit.directory import open_workunit_dir
from boincvm.workunit.make import InputSpec, WorkunitRequest, make_workunits
from boincvm.workunit.templates import Resources

GOLDEN = Path(__file__).parent / "golden"
JOB = VmJob(task=Task(application="/opt/hello/bin/hello"), output_files=(OutputFile("out", 100_000_000),))
RES = Resources(rsc_fpops_est=1e12, rsc_fpops_bound=1e14, delay_bound=86400)


def _req(tmp_path: Path, **kw: object) -> WorkunitRequest:
    base: dict[str, object] = {
        "app_name": "hello",
        "job": JOB,
        "output_dir": tmp_path / "wu",
        "resources": RES,
    }
    base.update(kw)
    return WorkunitRequest(**base)  # type: ignore[arg-type]


def test_single_workunit_templates_match_boinc_golden_files(tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("world")
    result = make_workunits(_req(tmp_path, inputs=(InputSpec("in & <x>", str(data)),), command_line="--n 1"))
    assert result.count == 1
    wu = tmp_path / "wu"
    assert (wu / "templates/hello_in.xml").read_text() == (GOLDEN / "hello_in.xml").read_text()
    assert (wu / "templates/hello_out.xml").read_text() == (GOLDEN / "hello_out.xml").read_text()
    rec = open_workunit_dir(wu).record()
    assert [f.open_name for f in rec.files] == ["vm_job.xml", "in & <x>"]
    staged = wu / "download" / rec.files[1].physical_name
    assert staged.read_text() == "world"
    assert md5_file(staged) == (rec.files[1].md5, 5)
    job, findings = parse_job((wu / "download" / rec.files[0].physical_name).read_bytes())
    assert findings == []
    assert job.task is not None and job.task.application == "/opt/hello/bin/hello"
    assert rec.command_line == "--n 1"
    line = (wu / "jobs.txt").read_text().strip()
    files = f"{rec.files[0].physical_name} {rec.files[1].physical_name}"
    assert line == f"--wu_name hello_0 --command_line '--n 1' {files}"
    assert validate_path(wu).ok


def test_batch_shares_identical_files_and_renders_templates(tmp_path: Path) -> None:
    shared = tmp_path / "shared.bin"
    shared.write_bytes(b"\0" * 100_000)
    rows = tmp_path / "rows.jsonl"
    lines = []
    for i in range(50):
        (tmp_path / f"p{i}.txt").write_text(f"param {i}")
        lines.append(json.dumps({"seed": i, "param": f"p{i}.txt"}))
    rows.write_text("\n".join(lines) + "\n")
    job = VmJob(task=Task(application="/opt/sim"), output_files=(OutputFile("out", 1000),))
    result = make_workunits(
        _req(
            tmp_path,
            job=job,
            batch=rows,
            name="sim_{{ seed }}",
            command_line="--seed {{ seed }} --x '{{ param }}'",
            inputs=(InputSpec("shared", str(shared)), InputSpec("param", "{{ param }}")),
        )
    )
    assert result.count == 50
    # one shared job file + 50 params + 1 shared input
    assert result.unique_files == 52
    assert result.staged_bytes < 100_000 * 2
    records = list(open_workunit_dir(tmp_path / "wu").records())
    assert [r.name for r in records[:3]] == ["sim_0", "sim_1", "sim_2"]
    assert records[7].command_line == f"--seed 7 --x '{tmp_path}/p7.txt'".replace(f"{tmp_path}/", "")
    assert '--command_line "--seed 7' in (tmp_path / "wu/jobs.txt").read_text().splitlines()[7]
    assert check_workunit_dir(tmp_path / "wu")[-1].severity.value == "info"


def test_csv_batch(tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("n,label\n1,a\n2,b\n")
    job = VmJob(task=Task(application="/bin/p"), output_files=(OutputFile("out", 10),))
    result = make_workunits(_req(tmp_path, job=job, batch=rows, name="w_{{ label }}", command_line="{{ n }}"))
    assert result.count == 2
    assert [r.name for r in open_workunit_dir(tmp_path / "wu").records()] == ["w_a", "w_b"]


def test_missing_input_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        make_workunits(_req(tmp_path, inputs=(InputSpec("in", str(tmp_path / "nope")),)))
    assert list(tmp_path.iterdir()) == []


def test_batch_error_in_last_row_leaves_nothing_behind(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"n": 1}\n{"n": 2}\n{"m": 3}\n')
    job = VmJob(task=Task(application="/bin/p"), output_files=(OutputFile("out", 10),))
    with pytest.raises(InputError, match="batch row 3"):
        make_workunits(_req(tmp_path, job=job, batch=rows, name="w{{ index }}", command_line="{{ n }}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_existing_output_needs_force(tmp_path: Path) -> None:
    make_workunits(_req(tmp_path))
    with pytest.raises(InputError, match="already exists"):
        make_workunits(_req(tmp_path))
    make_workunits(_req(tmp_path, force=True))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"app_name": "bad name"}, "app name"),
        ({"resources": Resources(rsc_fpops_est=10, rsc_fpops_bound=1)}, "below"),
        ({"job": VmJob(task=Task(application="/x"), output_files=(OutputFile("out"),))}, "max_nbytes"),
        (
            {"job": VmJob(task=Task(application="/x"), memory_mb=4096, output_files=(OutputFile("o", 1),))},
            "rsc_memory_bound",
        ),
        ({"job": VmJob(task=Task()), "inputs": ()}, "application"),
    ],
)
def test_bad_requests_are_refused(tmp_path: Path, kw: dict[str, object], match: str) -> None:
    with pytest.raises(InputError, match=match):
        make_workunits(_req(tmp_path, **kw))


def test_duplicate_workunit_names_are_refused(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"n": 1}\n{"n": 1}\n')
    with pytest.raises(InputError, match="used twice"):
        make_workunits(_req(tmp_path, batch=rows, name="w{{ n }}"))


def test_validate_finds_a_tampered_staged_file(tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("world")
    make_workunits(_req(tmp_path, inputs=(InputSpec("in", str(data)),)))
    rec = open_workunit_dir(tmp_path / "wu").record()
    (tmp_path / "wu/download" / rec.files[1].physical_name).write_text("WORLD")
    report = validate_path(tmp_path / "wu")
    assert report.kind is PathKind.WORKUNIT_DIR
    assert not report.ok
    assert any("md5" in f.message for f in report.findings)


def test_validate_finds_a_missing_max_nbytes_in_output_template(tmp_path: Path) -> None:
    make_workunits(_req(tmp_path))
    tpl = tmp_path / "wu/templates/hello_out.xml"
    tpl.write_text(tpl.read_text().replace("<max_nbytes>100000000</max_nbytes>", ""))
    report = validate_path(tmp_path / "wu")
    assert "output_template.file_info[0].max_nbytes" in [f.place for f in report.findings]


def test_command_line_with_both_quote_kinds_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="both"):
        make_workunits(_req(tmp_path, command_line="""--a "x" --b 'y'"""))
    assert list(tmp_path.iterdir()) == []
