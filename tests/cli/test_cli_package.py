"""``boincvm package-rpm`` through click, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from boincvm.cli import cli, main
from boincvm.findings import has_errors
from boincvm.package import check_package, inspect_package

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_package_rpm_prints_the_path_only(tmp_path: Path) -> None:
    code, out, err = _run(
        ["package-rpm", str(EXAMPLES / "hello/program"), "--name", "hello", "--version", "1.0",
         "--entry-point", "bin/hello", "--output", str(tmp_path)]
    )  # fmt: skip
    assert code == 0, err
    path = Path(out.strip())
    assert path == tmp_path / "hello-1.0-1.noarch.rpm" and path.is_file()
    assert "built" in err
    assert not has_errors(check_package(path))
    files = {e.path for e in inspect_package(path).entries}
    assert {"/opt/hello/bin/hello", "/usr/local/bin/hello"} <= files


def test_package_rpm_json_and_reproducible(tmp_path: Path) -> None:
    args = ["package-rpm", str(EXAMPLES / "longjob/program"), "--name", "longjob", "--version", "2",
            "--release", "3", "--requires", "coreutils", "--json"]  # fmt: skip
    code, out, err = _run([*args, "-o", str(tmp_path / "a")])
    assert code == 0, err
    first = json.loads(out)
    assert first["name"] == "longjob" and first["path"].endswith("longjob-2-3.noarch.rpm")
    assert first["size"] == Path(first["path"]).stat().st_size and len(first["md5"]) == 32
    # A copy of the directory (other times, other place) gives the same bytes.
    copy = tmp_path / "copy"
    shutil.copytree(EXAMPLES / "longjob/program", copy)
    os.utime(copy / "bin/longjob", (1, 1))
    args[1] = str(copy)
    code, out, _ = _run([*args, "-o", str(tmp_path / "b")])
    assert code == 0 and json.loads(out)["md5"] == first["md5"]
    assert inspect_package(Path(first["path"])).requires == ("coreutils",)


def test_package_rpm_tar(tmp_path: Path) -> None:
    code, out, err = _run(
        ["package-rpm", str(EXAMPLES / "hello/program"), "--name", "hello", "--version", "1.0",
         "--format", "tar", "--entry-point", "bin/hello", "-o", str(tmp_path)]
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() == str(tmp_path / "hello-1.0-1.tar.gz")
    assert not has_errors(check_package(Path(out.strip())))


def test_package_rpm_post_install_is_a_scriptlet(tmp_path: Path) -> None:
    post = tmp_path / "post.sh"
    post.write_text("echo 100% %{buildroot} > /opt/hello/done\n%files\n")
    code, out, err = _run(
        ["package-rpm", str(EXAMPLES / "hello/program"), "--name", "hello", "--version", "1.0",
         "--post-install", str(post), "-o", str(tmp_path)]
    )  # fmt: skip
    assert code == 0, err
    scripts = inspect_package(Path(out.strip())).scriptlets
    # Spec-significant characters reach the scriptlet as written.
    assert scripts.get("postin", "").strip() == "echo 100% %{buildroot} > /opt/hello/done\n%files"
    assert "busybox rpm does not run scriptlets" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--name", "bad name", "--version", "1"], "package name"),
        (["--name", "x", "--version", "1-2"], "version"),
        (["--name", "x", "--version", "1", "--entry-point", "../etc/passwd"], "entry point"),
        (["--name", "x", "--version", "1", "--prefix", "/opt/../etc"], "prefix"),
        (["--name", "x", "--version", "1", "--format", "tar", "--requires", "bash"], "tarball"),
        (["--name", "x", "--version", "1", "--requires", "a\n%post\nrm -rf /"], "requirement"),
        (["--name", "x", "--version", "1", "--summary", "a\nb"], "one line"),
    ],
)
def test_bad_requests_are_one_sentence_and_exit_3(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["package-rpm", str(EXAMPLES / "hello/program"), *extra, "-o", str(tmp_path)])
    captured = capsys.readouterr()
    assert exited.value.code == 3
    assert captured.out == ""
    assert message in captured.err and "Traceback" not in captured.err


def test_validate_accepts_the_built_package(tmp_path: Path) -> None:
    code, out, _ = _run(
        ["package-rpm", str(EXAMPLES / "hello/program"), "--name", "hello", "--version", "1.0",
         "-o", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    result = CliRunner().invoke(cli, ["validate", out.strip()], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
