"""Hostile CLI input: options, names, numbers, files, encodings, output directories, signals.

Every input is built here by code. Each case asserts the exit code, the sentence, the hint
and that the sandbox (inputs, canary) is exactly as before (see ``harness.py``).
"""

from __future__ import annotations

import io
import os
import signal
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hostile.harness import SECRET, Sandbox

ESC = "\x1b[31m"

MW = ["make-workunit", "--app", "app", "--application", "/opt/app/run"]


def job_xml(body: str, head: str = "") -> bytes:
    return f"{head}<vm_job><task><application>/opt/app/run</application></task>{body}</vm_job>".encode()


def tarball(path: Path, members: list[tuple[str, bytes, int]]) -> Path:
    """A gzip tarball whose members are ``(name, type, mode)``."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, mode in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = mode
            data = b"x" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def _files(w: Path) -> None:
    (w / "in.txt").write_text("input\n")
    (w / "pkgdir").mkdir()
    tarball(w / "pkgdir" / "good.tar.gz", [("opt/app/run", tarfile.REGTYPE, 0o755)])


# -- cases run in-process: (id, setup(work) -> argv, exit code, sentence) ---------------------

Setup = Callable[[Path], list[str]]


def _job(body: str, head: str = "") -> Setup:
    def setup(w: Path) -> list[str]:
        (w / "job.xml").write_bytes(job_xml(body, head))
        return [*MW, "--job", "job.xml", "-o", "out"]

    return setup


def _job_time_limit(value: str) -> Setup:
    def setup(w: Path) -> list[str]:
        (w / "job.xml").write_text(f"<vm_job><task><time_limit>{value}</time_limit></task></vm_job>")
        return [*MW, "--job", "job.xml", "-o", "out"]

    return setup


def _validate_job_time_limit(w: Path) -> list[str]:
    (w / "job.xml").write_text("<vm_job><task><time_limit>nan</time_limit></task></vm_job>")
    return ["validate", "job.xml"]


def _mw(*args: str) -> Setup:
    def setup(w: Path) -> list[str]:
        _files(w)
        return [*MW, *args] + ([] if "-o" in args else ["-o", "out"])

    return setup


def _pi(*args: str) -> Setup:
    def setup(w: Path) -> list[str]:
        (w / "disk.qcow2").write_bytes(b"not really a disk")
        return ["package-image", "disk.qcow2", *args] + ([] if "--app" in args else ["--app", "app"])

    return setup


def _batch(name: str, data: bytes, *args: str) -> Setup:
    def setup(w: Path) -> list[str]:
        _files(w)
        (w / name).write_bytes(data)
        return [*MW, "--batch", name, *args, "-o", "out"]

    return setup


def _package(members: list[tuple[str, bytes, int]], command: str = "make-workunit") -> Setup:
    def setup(w: Path) -> list[str]:
        tarball(w / "evil.tar.gz", members)
        if command == "validate":
            return ["validate", "evil.tar.gz"]
        return [*MW, "--package", "evil.tar.gz", "-o", "out"]

    return setup


def _link(name: str, target: str, argv: list[str]) -> Setup:
    def setup(w: Path) -> list[str]:
        _files(w)
        (w / name).symlink_to(target)
        return argv

    return setup


def _overlap(make: Callable[[Path], list[str]]) -> Setup:
    def setup(w: Path) -> list[str]:
        _files(w)
        return make(w)

    return setup


def _prog(w: Path) -> list[str]:
    (w / "prog").mkdir()
    (w / "prog" / "run").write_text("#!/bin/sh\n")
    return [*MW, "--program", "prog", "-o", "prog/out", "--force"]


def _job_in_out(w: Path) -> list[str]:
    (w / "out").mkdir()
    (w / "out" / "job.xml").write_bytes(job_xml(""))
    return [*MW, "--job", "out/job.xml", "-o", "out", "--force"]


def _batch_in_out(w: Path) -> list[str]:
    (w / "out").mkdir()
    (w / "out" / "rows.csv").write_text("x\n1\n")
    return [*MW, "--batch", "out/rows.csv", "-o", "out", "--force"]


def _row_input_in_out(w: Path) -> list[str]:
    (w / "out").mkdir()
    (w / "out" / "data1").write_text("d\n")
    (w / "rows.csv").write_text("n\n1\n")
    return [*MW, "--batch", "rows.csv", "--input", "in=out/data{{ n }}", "-o", "out", "--force"]


def _keys_link_in_dir(w: Path) -> list[str]:
    (w / "keys").mkdir()
    (w / "keys" / "code_sign_public").symlink_to(w.parent / "canary" / "planted")
    return ["keys", "create", "keys"]


def _keys_verify_latin1(w: Path) -> list[str]:
    (w / "f").write_text("x")
    (w / "f.sig").write_text("00\n")
    (w / "key").write_bytes(b"1024\n\xe9\xe9\n")
    return ["keys", "verify", "f", "--key", "key"]


def _keys_sign_latin1(w: Path) -> list[str]:
    (w / "f").write_text("x")
    (w / "key").write_bytes(b"1024\n\xff\n")
    return ["keys", "sign", "f", "--key", "key"]


def _post_install_latin1(w: Path) -> list[str]:
    (w / "prog").mkdir()
    (w / "prog" / "run").write_text("#!/bin/sh\n")
    (w / "post.sh").write_bytes(b"echo caf\xe9\n")
    return ["package-rpm", "prog", "--name", "p", "--version", "1", "--post-install", "post.sh", "-o", "pk"]


def _results_link(w: Path) -> list[str]:
    (w / "wu").mkdir()
    (w / "av").mkdir()
    (w / "results").mkdir()
    (w / "results" / "stderr.txt").symlink_to(w.parent / "canary" / "planted")
    return ["run-local", "wu", "--app-version", "av", "--results", "results"]


def _results_dangling(w: Path) -> list[str]:
    (w / "wu").mkdir()
    (w / "av").mkdir()
    (w / "results").symlink_to(w.parent / "canary" / "newdir")
    return ["run-local", "wu", "--app-version", "av", "--results", "results"]


def _version_xml_escape(w: Path) -> list[str]:
    (w / "av").mkdir()
    (w / "av" / "version.xml").write_text(
        "<version><file><physical_name>../../canary/secret</physical_name>"
        "<logical_name>vm_job_defaults.xml</logical_name><main_program/></file>"
        "<api_version>7.20.0</api_version><is_wrapper/></version>"
    )
    return ["validate", "av"]


def _wu_record_escape(w: Path) -> list[str]:
    wu = w / "wu"
    (wu / "templates").mkdir(parents=True)
    (wu / "download").mkdir()
    (wu / "boincvm-workunits.json").write_text(
        '{"format": 1, "app_name": "app", "count": 1, "unique_files": 1, "staged_bytes": 1,'
        ' "input_template": "templates/app_in.xml", "output_template": "templates/app_out.xml",'
        ' "open_names": ["vm_job.xml"]}'
    )
    (wu / "workunits.jsonl").write_text(
        '{"name": "wu", "command_line": "", "files": [["vm_job.xml", "../../../canary/secret", "x", 1]]}\n'
    )
    (w / "av").mkdir()
    return ["run-local", "wu", "--app-version", "av", "--data-dir", "client"]


def _wu_summary_escape(w: Path) -> list[str]:
    wu = w / "wu"
    wu.mkdir()
    (wu / "boincvm-workunits.json").write_text(
        '{"format": 1, "app_name": "app", "count": 1, "input_template": "../../canary/secret",'
        ' "output_template": "t", "open_names": []}'
    )
    (w / "av").mkdir()
    return ["run-local", "wu", "--app-version", "av", "--data-dir", "client"]


def _zero(name: str, argv: list[str]) -> Setup:
    return _link(name, "/dev/zero", argv)


def _huge_job(w: Path) -> list[str]:
    with (w / "job.xml").open("wb") as f:
        f.truncate(17 * 1024 * 1024)
    return [*MW, "--job", "job.xml", "-o", "out"]


def _out_below_file(w: Path) -> list[str]:
    (w / "afile").write_text("x")
    return [*MW, "-o", "afile/out"]


CASES: list[tuple[str, Setup, int, str]] = [
    # XML: encodings, DTDs and entities, numbers
    ("xml-unknown-encoding", _job("", '<?xml version="1.0" encoding="klingon"?>'), 3, "encoding"),
    ("xml-wrong-encoding-utf16", _job("", '<?xml version="1.0" encoding="utf-16"?>'), 3, "not well-formed"),
    ("xml-dtd", _job("", "<!DOCTYPE vm_job>"), 3, "declares a DTD"),
    ("xml-entity", _job("", '<!DOCTYPE v [<!ENTITY e SYSTEM "file:///etc/passwd">]>'), 3, "DTD"),
    ("job-time-limit-nan", _job_time_limit("nan"), 3, "time_limit.*NaN"),
    ("job-time-limit-overflow", _job_time_limit("1e999"), 3, "time_limit.*infinite"),
    ("validate-time-limit-nan", _validate_job_time_limit, 4, "failed validation"),
    ("job-boot-timeout-inf", _job("<boot_timeout>inf</boot_timeout>"), 3, "boot_timeout.*infinite"),
    (
        "job-checkpoint-nan",
        _job("<minimum_checkpoint_interval>nan</minimum_checkpoint_interval>"),
        3,
        "minimum_checkpoint_interval.*NaN",
    ),
    (
        "job-max-nbytes-overflow",
        _job("<output_file><open_name>o</open_name><max_nbytes>1e999</max_nbytes></output_file>"),
        3,
        "max_nbytes.*infinite",
    ),
    ("job-boot-timeout-negative", _job("<boot_timeout>-1</boot_timeout>"), 3, "boot_timeout.*more than 0"),
    ("job-memory-not-int", _job("<memory_size_mb>1e999</memory_size_mb>"), 3, "memory_size_mb.*whole number"),
    # numbers on the command line
    ("opt-fpops-est-nan", _mw("--fpops-est", "nan"), 3, "rsc_fpops_est.*NaN"),
    ("opt-fpops-bound-inf", _mw("--fpops-bound", "inf"), 3, "rsc_fpops_bound.*infinite"),
    ("opt-memory-bound-inf", _mw("--memory-bound", "inf"), 3, "rsc_memory_bound.*infinite"),
    ("opt-delay-bound-negative", _mw("--delay-bound", "-5"), 3, "delay_bound.*more than 0"),
    ("opt-output-size-overflow", _mw("--output", "out.dat:1e999"), 3, "size.*infinite"),
    ("opt-output-size-nan", _mw("--output", "out.dat:nan"), 3, "size.*NaN"),
    ("opt-output-size-negative", _mw("--output", "out.dat:-1"), 3, "size.*more than 0"),
    ("opt-checkpoint-nan", _mw("--checkpoint-interval", "nan"), 3, "minimum_checkpoint_interval.*NaN"),
    # names in every naming option
    ("name-input-dotdot", _mw("--input", "..=in.txt"), 3, r"'\.\.' is not a file name"),
    ("name-input-slash", _mw("--input", "a/b=in.txt"), 3, "plain file name"),
    ("name-input-escape", _mw("--input", f"a{ESC}=in.txt"), 3, "control characters"),
    (
        "name-input-guest-dotdot",
        _mw("--input", "in=in.txt::../../etc/x"),
        3,
        "guest name.*leaves its directory",
    ),
    ("name-input-guest-absolute", _mw("--input", "in=in.txt::/etc/x"), 3, "guest name.*absolute"),
    ("name-input-guest-escape", _mw("--input", f"in=in.txt::x{ESC}"), 3, "guest name.*control"),
    ("name-output-dotdot", _mw("--output", "..:100"), 3, "not a file name"),
    ("name-output-guest-dotdot", _mw("--output", "o=../../x:100"), 3, "leaves its directory"),
    ("name-app-dotdot", _mw("--app", ".."), 3, "app name"),
    ("name-app-space", _mw("--app", "a b"), 3, "app name"),
    ("name-app-escape", _mw("--app", f"a{ESC}"), 3, "app name.*control"),
    ("name-wu-dotdot", _mw("--name", ".."), 3, "workunit name"),
    ("name-platform-escape", _pi("--platform", "/../../x"), 3, "platform"),
    ("name-plan-class-space", _pi("--plan-class", "a/b c"), 3, "plan class"),
    ("name-platform-terminal", _pi("--platform", "x\x1b]0;pwned\x07"), 3, "platform.*control"),
    ("name-pi-app-dotdot", _pi("--app", ".."), 3, "app name"),
    ("name-version-xml-physical", _version_xml_escape, 4, "failed validation"),
    ("name-wu-record-physical", _wu_record_escape, 3, "physical name.*not a file name|plain file name"),
    ("name-wu-summary-template", _wu_summary_escape, 3, "input_template.*leaves its directory"),
    # files: device, directory, dangling symlink, size, symlinked outputs
    ("file-job-device", _zero("job.xml", [*MW, "--job", "job.xml", "-o", "out"]), 3, "character device"),
    (
        "file-batch-device",
        _zero("rows.csv", [*MW, "--batch", "rows.csv", "-o", "out"]),
        3,
        "character device",
    ),
    ("file-validate-device", _zero("x.xml", ["validate", "x.xml"]), 3, "character device"),
    ("file-input-device", _zero("dev.bin", [*MW, "--input", "in=dev.bin", "-o", "out"]), 3, "not a regular"),
    ("file-input-directory", _mw("--input", "in=pkgdir"), 3, "not a regular file"),
    (
        "file-job-dangling",
        _link("job.xml", "../canary/missing", [*MW, "--job", "job.xml", "-o", "out"]),
        3,
        "does not exist",
    ),
    ("file-job-huge", _huge_job, 3, "larger than the limit"),
    ("file-keys-link-in-dir", _keys_link_in_dir, 3, "symlink"),
    ("file-keys-dir-dangling", _link("keys", "../canary/newkeys", ["keys", "create", "keys"]), 3, "symlink"),
    ("file-results-link-inside", _results_link, 3, "--results.*symlink"),
    ("file-results-dangling", _results_dangling, 3, "--results.*symlink"),
    # encodings
    ("enc-batch-csv-latin1", _batch("rows.csv", b"x\ncaf\xe9\n"), 3, r"rows\.csv, line 2.*not UTF-8"),
    ("enc-batch-jsonl-latin1", _batch("rows.jsonl", b'{"x": "caf\xe9"}\n'), 3, "line 1.*not UTF-8"),
    ("enc-post-install-latin1", _post_install_latin1, 3, "post-install.*not UTF-8"),
    ("enc-key-verify-non-ascii", _keys_verify_latin1, 3, "key file.*not ASCII"),
    ("enc-key-sign-non-ascii", _keys_sign_latin1, 3, "key file.*not ASCII"),
    # output directories that would destroy an input, or cannot be made
    (
        "out-holds-symlinked-input",
        _link("link.txt", "pkgdir/good.tar.gz", [*MW, "--input", "in=link.txt", "-o", "pkgdir", "--force"]),
        3,
        "holds --input",
    ),
    ("out-is-cwd", _mw("-o", ".", "--force"), 3, "working directory"),
    ("out-is-parent", _mw("-o", "..", "--force"), 3, "working directory"),
    (
        "out-holds-package",
        _mw("--package", "pkgdir/good.tar.gz", "-o", "pkgdir", "--force"),
        3,
        "holds --package",
    ),
    (
        "out-is-input-dir",
        _overlap(lambda w: [*MW, "--input", "in=pkgdir/good.tar.gz", "-o", "pkgdir", "--force"]),
        3,
        "holds --input",
    ),
    ("out-inside-program", _overlap(_prog), 3, "lies inside --program"),
    ("out-holds-job", _overlap(_job_in_out), 3, "holds --job"),
    ("out-holds-batch", _overlap(_batch_in_out), 3, "holds --batch"),
    ("out-holds-row-input", _overlap(_row_input_in_out), 3, "lies inside the output directory"),
    ("out-below-file", _out_below_file, 3, "afile is not a directory"),
    ("out-dangling-link", _link("out", "../canary/made", [*MW, "-o", "out"]), 3, "symlink"),
    ("out-unwritable", _mw("-o", "/proc/boincvm-out"), 3, "boincvm-out"),
    # jinja templates a batch renders
    (
        "jinja-include",
        _batch("rows.csv", b"x\n1\n", "--command-line", "{% include '/etc/passwd' %}"),
        3,
        "includes, imports",
    ),
    (
        "jinja-import",
        _batch("rows.csv", b"x\n1\n", "--command-line", "{% import '/etc/passwd' as p %}"),
        3,
        "includes, imports",
    ),
    (
        "jinja-from-import",
        _batch("rows.csv", b"x\n1\n", "--name", "{% from 'x' import y %}{{ x }}"),
        3,
        "includes, imports",
    ),
    (
        "jinja-extends",
        _batch("rows.csv", b"x\n1\n", "--command-line", "{% extends '/etc/passwd' %}"),
        3,
        "includes, imports",
    ),
    (
        "jinja-memory-bomb",
        _batch("rows.csv", b"x\n1\n", "--command-line", "{{ 'a' * 10000000000 }}"),
        3,
        "sandbox",
    ),
    (
        "jinja-recursive-macro",
        _batch("rows.csv", b"x\n1\n", "--name", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(x) }}"),
        3,
        "calls itself without end",
    ),
    (
        "jinja-endless-loops",
        _batch(
            "rows.csv",
            b"x\n1\n",
            "--command-line",
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        ),
        3,
        "ran longer than 2 s on one row",
    ),
    (
        "jinja-output-bomb",
        _batch(
            "rows.csv", b"x\n1\n", "--command-line", "{% for a in range(100000) %}{{ 'a' * 900 }}{% endfor %}"
        ),
        3,
        "longer than 1000000",
    ),
    (
        "jinja-row-type-error",
        _batch("rows.csv", b"x\n1\n", "--command-line", "{{ x + 1 }}"),
        3,
        "batch row 1.*failed on this row",
    ),
    # packages through make-workunit: the check validate runs
    ("pkg-dotdot-member", _package([("../", tarfile.DIRTYPE, 0o755)]), 3, r"refused.*'\.\.'"),
    ("pkg-dotdot-file", _package([("opt/../../etc/x", tarfile.REGTYPE, 0o644)]), 3, r"refused.*'\.\.'"),
    ("pkg-absolute-member", _package([("/etc/cron.d/x", tarfile.REGTYPE, 0o644)]), 3, "refused.*absolute"),
    ("pkg-dir-7777", _package([("opt/", tarfile.DIRTYPE, 0o7777)]), 3, "refused.*mode 7777"),
    ("pkg-setuid-file", _package([("opt/app/su", tarfile.REGTYPE, 0o4755)]), 3, "refused.*setuid"),
    ("pkg-device", _package([("opt/app/dev", tarfile.CHRTYPE, 0o644)]), 3, "refused.*device"),
    ("pkg-fifo", _package([("opt/app/fifo", tarfile.FIFOTYPE, 0o644)]), 3, "refused.*fifo"),
    (
        "pkg-validate-dir-7777",
        _package([("opt/", tarfile.DIRTYPE, 0o7777)], "validate"),
        4,
        "failed validation",
    ),
    # terminal escapes in names of missing files reach stderr escaped
    ("esc-missing-input", _mw("--input", f"in={ESC}x"), 3, "does not exist"),
    ("esc-validate-missing", lambda w: ["validate", f"{ESC}.xml"], 3, "does not exist"),
]


@pytest.mark.parametrize(("setup", "code", "sentence"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused(sandbox: Sandbox, setup: Setup, code: int, sentence: str) -> None:
    argv = setup(sandbox.work)
    outcome = sandbox.run(argv)
    sandbox.assert_refused(outcome, code, sentence)
    assert SECRET.decode().strip() not in outcome.out + outcome.err


def test_validate_names_the_finding(sandbox: Sandbox) -> None:
    """validate's exit-4 verdicts above carry the finding itself, not only the count."""
    (sandbox.work / "job.xml").write_text("<vm_job><task><time_limit>nan</time_limit></task></vm_job>")
    outcome = sandbox.run(["validate", "job.xml"])
    assert "vm_job.task.time_limit" in outcome.err and "NaN" in outcome.err, str(outcome)


def test_click_usage_error_escapes_control_characters(sandbox: Sandbox) -> None:
    """click's own messages (exit 2) name the value too; they reach the terminal escaped."""
    outcome = sandbox.run([*MW, "--batch", f"{ESC}rows.csv", "-o", "out"])
    assert outcome.code == 2, str(outcome)
    assert "\x1b" not in outcome.err, repr(outcome.err)
    assert "\\x1b[31mrows.csv" in outcome.err, repr(outcome.err)
    assert not sandbox.changes()


# -- cases that could hang or need a signal: run as a child process --------------------------

FIFO_CASES = [
    ("fifo-job", "job.xml", [*MW, "--job", "job.xml", "-o", "out"], 3, "FIFO"),
    ("fifo-validate-xml", "x.xml", ["validate", "x.xml"], 3, "FIFO"),
    ("fifo-validate-kernel", "vmlinuz", ["validate", "vmlinuz"], 3, "FIFO"),
    ("fifo-batch", "rows.csv", [*MW, "--batch", "rows.csv", "-o", "out"], 3, "FIFO"),
    (
        "fifo-post-install",
        "post.sh",
        ["package-rpm", "prog", "--name", "p", "--version", "1", "--post-install", "post.sh"],
        3,
        "FIFO",
    ),
]


@pytest.mark.parametrize(
    ("name", "argv", "code", "sentence"), [c[1:] for c in FIFO_CASES], ids=[c[0] for c in FIFO_CASES]
)
def test_fifo_refused_at_once(sandbox: Sandbox, name: str, argv: list[str], code: int, sentence: str) -> None:
    os.mkfifo(sandbox.work / name)
    (sandbox.work / "prog").mkdir()
    (sandbox.work / "prog" / "run").write_text("#!/bin/sh\n")
    outcome = sandbox.run_process(argv, timeout=60)
    sandbox.assert_refused(outcome, code, sentence)


def _children_named(parent: int, word: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and word.encode() in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_mid_batch_leaves_nothing(sandbox: Sandbox, signum: int) -> None:
    """A signal while a large batch is being made removes the half-built directory and the
    temporary package directory (its TMPDIR is inside the sandbox, so the tree check sees it)."""
    w = sandbox.work
    tmpdir = sandbox.root / "tmp"
    tmpdir.mkdir()
    (w / "prog").mkdir()
    (w / "prog" / "run").write_text("#!/bin/sh\n")
    (w / "in.txt").write_text("x\n")
    (w / "rows.csv").write_text("n\n" + "".join(f"{i}\n" for i in range(400_000)))
    seen: dict[str, object] = {}

    def watch() -> None:
        deadline = time.monotonic() + 100
        while time.monotonic() < deadline:
            building = list(w.glob(".out.*.tmp"))
            packages = list(tmpdir.glob("boincvm-package-*"))
            if building and packages:
                for pid in _children_named(os.getpid(), "boincvm"):
                    seen["mid_run"] = [p.name for p in building + packages]
                    os.kill(pid, signum)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    argv = [
        *MW,
        "--program",
        "prog",
        "--batch",
        "rows.csv",
        "--input",
        "in=in.txt",
        "--name",
        "wu_{{ n }}",
        "-o",
        "out",
    ]
    outcome = sandbox.run_process(argv, timeout=120, env={"TMPDIR": str(tmpdir)})
    watcher.join()
    assert seen.get("mid_run"), f"the signal was never sent\n{outcome}"
    sandbox.assert_refused(outcome, 128 + signum, f"terminated by {signal.Signals(signum).name}")
