"""With ``--json``, a failing command still prints one JSON object on stdout for scripts to read."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import RunFn


def test_a_refusal_is_one_json_object_on_stdout(tmp_path: Path, run: RunFn) -> None:
    code, out, err = run(
        [
            "make-workunit",
            "--app",
            "hello",
            "--application",
            "/bin/true",
            "--input",
            f"in={tmp_path / 'missing'}",
            "-o",
            str(tmp_path / "wu"),
            "--json",
        ]
    )
    assert code == 3
    doc = json.loads(out)
    assert doc["ok"] is False and doc["exit_code"] == 3
    assert "missing" in doc["error"]
    assert " ".join(doc["error"].split()) in " ".join(err.split())
    assert doc["hint"] and "Traceback" not in err


def test_validate_prints_its_findings_once(tmp_path: Path, run: RunFn) -> None:
    bad = tmp_path / "job.xml"
    bad.write_text("<vm_job><task><time_limit>nan</time_limit></task></vm_job>")
    code, out, _ = run(["validate", "--json", str(bad)])
    assert code == 4
    reports = json.loads(out)  # one document: the findings, not a second error object after them
    assert isinstance(reports, list) and reports[0]["findings"]


def test_a_usage_error_is_json_too(run: RunFn) -> None:
    code, out, _ = run(["deploy", "--json"])
    assert code == 2
    assert json.loads(out)["ok"] is False
