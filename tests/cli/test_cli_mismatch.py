"""A workunit and an app version of different apps are refused everywhere both are named
(make-workunit --app-version, validate, run-local); validate judges every path it is given and
knows container images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.conftest import RunFn, make_app_version
from tests.oci_images import M, write_docker_archive, write_layout


@pytest.fixture(scope="module")
def app_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_app_version(tmp_path_factory.mktemp("av"), "mcpi")


def _workunit(run: RunFn, out: Path, app: str, *extra: str) -> tuple[int, str]:
    code, _, err = run(["make-workunit", "--app", app, "--application", "/bin/true", "-o", str(out), *extra])
    return code, err


def test_make_workunit_refuses_another_apps_version(app_version: Path, tmp_path: Path, run: RunFn) -> None:
    code, err = _workunit(run, tmp_path / "wu", "mcpy", "--app-version", str(app_version))
    assert code == 3
    assert f"the workunits are for app 'mcpy', but the app version {app_version} is for 'mcpi'" in " ".join(
        err.split()
    )
    assert "hint: use --app mcpi" in err
    assert not (tmp_path / "wu").exists()


def test_validate_and_run_local_refuse_the_pair(app_version: Path, tmp_path: Path, run: RunFn) -> None:
    code, _ = _workunit(run, tmp_path / "wu", "mcpy")
    assert code == 0
    code, out, _ = run(["validate", "--json", str(tmp_path / "wu"), str(app_version)])
    assert code == 4
    wu_report, av_report = json.loads(out)
    assert av_report["valid"] is True
    (finding,) = [f for f in wu_report["findings"] if f["place"] == "app_name"]
    assert "are for app 'mcpy', but the app version" in finding["message"]
    code, _, err = run(["run-local", str(tmp_path / "wu"), "--app-version", str(app_version)])
    assert code == 3
    assert "the workunits are for app 'mcpy'" in err and "Traceback" not in err


def test_validate_reports_every_path(app_version: Path, tmp_path: Path, run: RunFn) -> None:
    (tmp_path / "notes.bin").write_bytes(b"\0\1")
    (tmp_path / "empty").mkdir()
    layout = write_layout(tmp_path / "oci", [[M("hello", data=b"hi\n")]])
    archive = write_docker_archive(tmp_path / "saved.tar", [[M("hello", data=b"hi\n")]])
    paths = [tmp_path / "notes.bin", app_version, tmp_path / "empty", layout, archive]
    code, out, err = run(["validate", "--json", *map(str, paths)])
    assert code == 3  # the worst verdict: a path it could not judge
    reports = json.loads(out)
    assert [r["kind"] for r in reports] == [
        "unknown",
        "app version",
        "unknown",
        "container image",
        "container image",
    ]
    assert [r["valid"] for r in reports] == [False, True, False, True, True]
    assert "does not know what this file is" in reports[0]["findings"][0]["message"]
    assert "Traceback" not in err
