"""make-workunit --buda-batch: BUDA's layout (a directory per job, cmdline, shared_input_files/)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from tests.cli.conftest import RunFn


def buda_batch(root: Path) -> Path:
    (root / "shared_input_files").mkdir(parents=True)
    (root / "shared_input_files" / "model.dat").write_bytes(b"shared model\n")
    for job, (data, cmdline) in {"j1": (b"one\n", "--seed 1\n"), "j2": (b"two\n", None)}.items():
        (root / job).mkdir()
        (root / job / "in.txt").write_bytes(data)
        if cmdline is not None:
            (root / job / "cmdline").write_text(cmdline)
    (root / ".DS_Store").write_bytes(b"skipped")
    return root


def make(run: RunFn, tmp_path: Path, batch: Path) -> tuple[int, str, str]:
    return run(
        [
            "make-workunit",
            "--app",
            "buda",
            "--application",
            "/bin/prog",
            "--buda-batch",
            str(batch),
            "--output",
            "out:1000",
            "-o",
            str(tmp_path / "wu"),
        ]
    )


def records(wu: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (wu / "workunits.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("as_zip", [False, True])
def test_one_workunit_per_job_directory_shared_files_staged_once(
    tmp_path: Path, run: RunFn, as_zip: bool
) -> None:
    batch = buda_batch(tmp_path / "batch")
    if as_zip:
        archive = tmp_path / "batch.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted(batch.rglob("*")):
                zf.write(p, p.relative_to(batch))
        batch = archive
    code, _, err = make(run, tmp_path, batch)
    assert code == 0, err
    recs = records(tmp_path / "wu")
    assert [r["name"] for r in recs] == ["buda_j1", "buda_j2"]
    assert [r["command_line"] for r in recs] == ["--seed 1", ""]
    files = [{f[0]: f[1] for f in r["files"]} for r in recs]  # type: ignore[attr-defined]
    assert files[0]["model.dat"] == files[1]["model.dat"]  # the shared input is staged once
    assert files[0]["in.txt"] != files[1]["in.txt"]
    staged = {p.read_bytes() for p in (tmp_path / "wu/download").iterdir()}
    assert {b"shared model\n", b"one\n", b"two\n"} <= staged


def test_a_job_missing_an_input_is_refused_and_nothing_written(tmp_path: Path, run: RunFn) -> None:
    batch = buda_batch(tmp_path / "batch")
    (batch / "j2" / "in.txt").unlink()
    code, _, err = make(run, tmp_path, batch)
    assert code == 3 and "every job needs the same files" in err, err
    assert not (tmp_path / "wu").exists()


def test_a_stray_file_at_the_top_is_refused(tmp_path: Path, run: RunFn) -> None:
    batch = buda_batch(tmp_path / "batch")
    (batch / "notes.txt").write_text("x")
    code, _, err = make(run, tmp_path, batch)
    assert code == 3 and "notes.txt in the batch is not a directory" in err, err


def test_a_zip_member_leaving_the_batch_is_refused(tmp_path: Path, run: RunFn) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("j1/in.txt", "x")
        zf.writestr("../escaped", "x")
    code, _, err = make(run, tmp_path, archive)
    assert code == 3 and "leaves the batch" in err, err
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "wu").exists()
