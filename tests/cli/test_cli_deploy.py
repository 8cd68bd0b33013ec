"""``deploy``'s refusals that need no server, and what ``validate`` says of files ``update_versions``
would ship. Deploying into a real project is tested against BOINC's own server
(tests/integration/test_boinc_server.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.cli.conftest import RunFn, make_app_version


@pytest.fixture(scope="module")
def app_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_app_version(tmp_path_factory.mktemp("av"), "hello")


def test_the_summary_is_a_dot_name_update_versions_skips(app_version: Path) -> None:
    names = sorted(p.name for p in app_version.iterdir())
    assert ".boincvm-app-version.json" in names
    assert "boincvm-app-version.json" not in names


def test_validate_flags_files_update_versions_would_ship(
    app_version: Path, tmp_path: Path, run: RunFn
) -> None:
    copy = tmp_path / "av"
    subprocess.run(["cp", "-a", str(app_version), str(copy)], check=True)
    (copy / ".boincvm-app-version.json").rename(copy / "boincvm-app-version.json")
    (copy / "notes.txt").write_text("left behind\n")
    code, out, _ = run(["validate", "--json", str(copy)])
    assert code == 4
    findings = {f["place"]: f for f in json.loads(out)[0]["findings"] if f["severity"] == "error"}
    assert set(findings) == {"boincvm-app-version.json", "notes.txt"}
    assert "update_versions would ship it to every volunteer" in findings["notes.txt"]["message"]
    assert ".boincvm-app-version.json" in findings["boincvm-app-version.json"]["hint"]


def test_deploy_refuses_a_directory_that_is_not_a_project(
    app_version: Path, tmp_path: Path, run: RunFn
) -> None:
    code, out, err = run(["deploy", str(tmp_path), str(app_version), "--json"])
    assert code == 3
    assert "is not a BOINC project directory (no config.xml)" in err
    assert "hint: give the project's root directory" in err
    assert "Traceback" not in err
    assert json.loads(out) == {
        "ok": False,
        "exit_code": 3,
        "error": f"{tmp_path} is not a BOINC project directory (no config.xml)",
        "hint": "give the project's root directory, the one BOINC's make_project created "
        "(config.xml, bin/, apps/)",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_deploy_refuses_a_path_it_does_not_know(tmp_path: Path, run: RunFn) -> None:
    code, _, err = run(["deploy", str(tmp_path), str(tmp_path)])
    assert code == 3
    assert "not a BOINC project directory" in err
