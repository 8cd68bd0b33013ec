"""The one guest command that surveys the contract files each poll, run by real shells.

``SURVEY_SCRIPT`` is what the wrapper runs in the guest every PROGRESS_PERIOD: the kind of
each contract file and the first bytes of the small regular ones, in one command instead
of one for the kinds and three agent calls per file. Here it runs under the shells guests
have (dash as Debian's ``/bin/sh``, busybox ash as the bundled guest's) on a directory
holding every kind of path a hostile program can leave, and its output is parsed back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from boincvm.wrapper.guest_contract import GuestFileKind, kinds_argv, parse_kinds, parse_survey, survey_argv

SHELLS = [pytest.param(["/bin/sh"], id="dash"), pytest.param(["busybox", "sh"], id="busybox-ash")]
TOKEN = "boincvm-0123456789abcdef"


def _run(shell: list[str], argv: list[str]) -> bytes:
    assert argv[0] == "/bin/sh"
    if shutil.which(shell[0]) is None:
        raise AssertionError(f"{shell[0]} is not installed: scripts/bootstrap.sh installs it")
    done = subprocess.run([*shell, *argv[1:]], capture_output=True, timeout=30, check=True)
    return done.stdout


def _job_dir(tmp_path: Path) -> Path:
    job = tmp_path / "job"
    job.mkdir()
    (job / "fraction").write_bytes(b"0.25\n")
    (job / "noeol").write_bytes(b"0.5")
    (job / "empty").write_bytes(b"")
    # Content that looks like the script's own framing, without the token.
    (job / "framing").write_bytes(b"boincvm-\n\nboincvm-x 0\nfile\n\x00\xff")
    (job / "big").write_bytes(b"9" * 5000)
    os.mkfifo(job / "fifo")
    (job / "dir").mkdir()
    (job / "out").symlink_to("/etc/hostname")
    (job / "inside").symlink_to("fraction")
    return job


@pytest.mark.parametrize("shell", SHELLS)
def test_the_survey_gives_kinds_and_small_files_and_never_opens_the_rest(
    tmp_path: Path, shell: list[str]
) -> None:
    job = _job_dir(tmp_path)
    names = ["fraction", "noeol", "empty", "framing", "big", "fifo", "dir", "out", "inside", "missing"]
    paths = [str(job / n) for n in names]
    entries = [(p, 4097) for p in paths[:-1]] + [(paths[-1], 0)]
    out = _run(shell, survey_argv(str(job), TOKEN, entries))
    survey = parse_survey(out, TOKEN, paths)
    assert survey is not None, out
    kinds = {Path(p).name: k for p, k in survey.kinds.items()}
    assert kinds == {
        "fraction": GuestFileKind.FILE,
        "noeol": GuestFileKind.FILE,
        "empty": GuestFileKind.FILE,
        "framing": GuestFileKind.FILE,
        "big": GuestFileKind.FILE,
        "fifo": GuestFileKind.FIFO,
        "dir": GuestFileKind.DIRECTORY,
        "out": GuestFileKind.OUTSIDE,
        "inside": GuestFileKind.FILE,
        "missing": GuestFileKind.MISSING,
    }
    data = {Path(p).name: d for p, d in survey.data.items()}
    assert data["fraction"] == b"0.25\n"
    assert data["noeol"] == b"0.5"
    assert data["empty"] == b""
    assert data["framing"] == (job / "framing").read_bytes()
    assert data["inside"] == b"0.25\n"
    assert data["big"] == b"9" * 4097, "one byte more than the bound: the wrapper reads it by the agent"
    assert data["dir"] == b"", "a directory is listed (it is empty), not opened as a file"
    assert set(data) == {"fraction", "noeol", "empty", "framing", "big", "inside", "dir"}, (
        "a FIFO, a link out of the job's directory and a kind-only entry are never read"
    )


@pytest.mark.parametrize("shell", SHELLS)
def test_the_survey_and_the_kind_script_agree(tmp_path: Path, shell: list[str]) -> None:
    job = _job_dir(tmp_path)
    paths = [str(p) for p in sorted(job.iterdir())] + [str(job / "missing"), "/etc/hostname"]
    kinds = parse_kinds(_run(shell, kinds_argv(str(job), paths)), paths)
    survey = parse_survey(_run(shell, survey_argv(str(job), TOKEN, [(p, 0) for p in paths])), TOKEN, paths)
    assert kinds is not None and survey is not None
    assert dict(survey.kinds) == kinds
    assert not survey.data


@pytest.mark.parametrize(
    "out",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"file\n", id="too-few-lines"),
        pytest.param(b"file\nfile\nfile\n", id="too-many-lines"),
        pytest.param(b"bogus\nfile\n", id="unknown-kind"),
        pytest.param(b"file\n" + TOKEN.encode() + b"\n0.5", id="unclosed-content"),
        pytest.param(b"\xff\xfe\nfile\n", id="not-ascii"),
    ],
)
def test_output_that_does_not_fit_is_refused(out: bytes) -> None:
    assert parse_survey(out, TOKEN, ["/job/a", "/job/b"]) is None


def test_a_failed_read_gives_no_content() -> None:
    tok = TOKEN.encode()
    out = b"file\n" + tok + b"\n\n" + tok + b" 1\nmissing\n"
    survey = parse_survey(out, TOKEN, ["/job/a", "/job/b"])
    assert survey is not None
    assert survey.kind("/job/a") is GuestFileKind.FILE and "/job/a" not in survey.data
    assert survey.kind("/job/b") is GuestFileKind.MISSING


@pytest.mark.parametrize("shell", SHELLS)
def test_a_directory_is_listed_without_dot_files_and_with_a_bound(tmp_path: Path, shell: list[str]) -> None:
    job = tmp_path / "job"
    up = job / ".boinc" / "trickle_up"
    up.mkdir(parents=True)
    empty = job / "empty"
    empty.mkdir()
    for name in ("t2", "t1", ".t0.tmp", "t3"):
        (up / name).write_text("x")
    (up / "t4").symlink_to("/nonexistent")
    out = _run(shell, survey_argv(str(job), TOKEN, [(str(up), 3), (str(empty), 3), (str(job / "gone"), 3)]))
    survey = parse_survey(out, TOKEN, [str(up), str(empty), str(job / "gone")])
    assert survey is not None, out
    assert survey.kind(str(up)) is GuestFileKind.DIRECTORY
    assert survey.data[str(up)].split() == [b"t1", b"t2", b"t3"], "the first three names, sorted"
    assert survey.data[str(empty)].split() == []
    assert survey.kind(str(job / "gone")) is GuestFileKind.MISSING and str(job / "gone") not in survey.data


@pytest.mark.parametrize("shell", SHELLS)
def test_a_negative_size_hands_over_the_end_of_a_wrapper_file(tmp_path: Path, shell: list[str]) -> None:
    job = _job_dir(tmp_path)
    own = tmp_path / "job.wrapper"
    own.mkdir()
    (own / "output.log").write_bytes(b"".join(b"line %d\n" % i for i in range(1000)))
    (own / "short.log").write_bytes(b"only\nthis")
    (own / "link.log").symlink_to(own / "output.log")
    os.mkfifo(own / "fifo.log")
    names = ["output.log", "short.log", "link.log", "fifo.log", "gone.log"]
    paths = [str(own / n) for n in names] + [str(job / "fraction")]
    entries = [(p, -11) for p in paths[:-1]] + [(paths[-1], 4097)]
    survey = parse_survey(_run(shell, survey_argv(str(job), TOKEN, entries)), TOKEN, paths)
    assert survey is not None
    assert [survey.kind(p) for p in paths] == [
        GuestFileKind.FILE,
        GuestFileKind.FILE,
        GuestFileKind.OUTSIDE,  # a link is never followed
        GuestFileKind.OTHER,  # a FIFO is never opened
        GuestFileKind.MISSING,
        GuestFileKind.FILE,
    ]
    assert survey.data == {paths[0]: b"8\nline 999\n", paths[1]: b"only\nthis", paths[-1]: b"0.25\n"}


@pytest.mark.parametrize("shell", SHELLS)
def test_a_link_on_the_way_is_followed_and_judged(tmp_path: Path, shell: list[str]) -> None:
    """Paths through no link are judged by test(1) alone; one with a link (or ``..``) on
    its way is resolved by readlink, and must stay inside the job's directory."""
    job = _job_dir(tmp_path)
    (job / "dir" / "sub").mkdir()
    (job / "dir" / "sub" / "x").write_bytes(b"nested\n")
    (job / "away").symlink_to("/etc")  # a directory link out of the job's directory
    (job / "near").symlink_to("dir")  # a directory link inside it
    (tmp_path / "secret").write_bytes(b"not the job's\n")
    cases = {
        "dir/sub/x": GuestFileKind.FILE,
        "near/sub/x": GuestFileKind.FILE,
        "away/hostname": GuestFileKind.OUTSIDE,
        "dir/../fraction": GuestFileKind.FILE,
        "dir/../../secret": GuestFileKind.OUTSIDE,
        "dir//sub/x": GuestFileKind.FILE,
        "dir/sub": GuestFileKind.DIRECTORY,
    }
    paths = [f"{job}/{rel}" for rel in cases]
    survey = parse_survey(_run(shell, survey_argv(str(job), TOKEN, [(p, 100) for p in paths])), TOKEN, paths)
    kinds = parse_kinds(_run(shell, kinds_argv(str(job), paths)), paths)
    assert survey is not None and kinds is not None
    assert {p[len(str(job)) + 1 :]: k for p, k in survey.kinds.items()} == cases
    assert dict(survey.kinds) == kinds
    assert survey.data[f"{job}/near/sub/x"] == b"nested\n"
    assert f"{job}/dir/../../secret" not in survey.data and f"{job}/away/hostname" not in survey.data


@pytest.mark.parametrize("shell", SHELLS)
def test_the_root_as_the_job_directory_takes_every_absolute_path_as_inside(
    tmp_path: Path, shell: list[str]
) -> None:
    job = _job_dir(tmp_path)
    paths = [str(job / "fraction"), str(job / "out"), str(job / "missing")]
    kinds = parse_kinds(_run(shell, kinds_argv("/", paths)), paths)
    file, missing = GuestFileKind.FILE, GuestFileKind.MISSING
    assert kinds == {paths[0]: file, paths[1]: file, paths[2]: missing}
