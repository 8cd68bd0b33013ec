"""The guest-side BOINC API, run for real on this host: compiled C programs, the Python
module and the shell command, with the test playing the wrapper's part of the files."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.guestapi import PYTHON_MODULE, SHELL_SCRIPT, source, static_library, write_guest_api

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "upper_case"
TEXT = b"hello, volunteers: these bytes go through boincvm's guest API.\n" * 4
#: Generous bounds for waits on events (never a pass/fail decided by a clock).
WAIT = 60.0


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_guest_api(tmp_path_factory.mktemp("api") / "guest-api").directory


@pytest.fixture(scope="module")
def c_upper_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bin") / "upper_case"
    lib, _ = static_library()
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-static",
            "-I",
            str(source("boinc_api.h").parent),
            str(EXAMPLES / "upper_case.c"),
            "-L",
            str(lib.parent),
            "-lboinc_api",
            "-o",
            str(out),
        ],
        check=True,
    )
    return out


def _python_upper_case() -> list[str]:
    return [sys.executable, str(EXAMPLES / "upper_case.py")]


def _env(api_dir: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BOINCVM_API_DIR"}
    env["PYTHONPATH"] = str(source(PYTHON_MODULE).parent)
    if api_dir is not None:
        env["BOINCVM_API_DIR"] = str(api_dir)
    return env


def _workdir(tmp_path: Path) -> tuple[Path, Path]:
    work = tmp_path / "job"
    work.mkdir()
    (work / "in").write_bytes(TEXT)
    api_dir = work / ".boinc"
    api_dir.mkdir(mode=0o700)
    return work, api_dir


def _wait_for(predicate: object, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"waited {WAIT:g} s for {what}"
        time.sleep(0.02)


def _status(api_dir: Path) -> dict[str, float]:
    try:
        text = (api_dir / "status").read_text()
    except FileNotFoundError:
        return {}
    return {k: float(v) for k, _, v in (line.partition("=") for line in text.splitlines()) if v}


PROGRAMS = ["c", "python"]


@pytest.fixture(params=PROGRAMS)
def program(request: pytest.FixtureRequest, c_upper_case: Path) -> list[str]:
    return [str(c_upper_case)] if request.param == "c" else _python_upper_case()


def test_the_c_program_is_linked_statically(c_upper_case: Path) -> None:
    out = subprocess.run(["file", str(c_upper_case)], capture_output=True, text=True, check=True).stdout
    assert "statically linked" in out


def test_guest_api_writes_every_file_and_a_reproducible_library(api: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in api.iterdir()) == [
        "README.txt",
        "boinc",
        "boinc.py",
        "boinc_api.c",
        "boinc_api.h",
        "libboinc_api.a",
    ]
    again = write_guest_api(tmp_path / "again")
    assert (again.directory / "libboinc_api.a").read_bytes() == (api / "libboinc_api.a").read_bytes()
    assert again.library_cached
    assert os.access(api / "boinc", os.X_OK)


@pytest.mark.parametrize("kind", PROGRAMS)
def test_standalone_runs_to_completion(kind: str, c_upper_case: Path, tmp_path: Path) -> None:
    work, _ = _workdir(tmp_path)
    argv = [str(c_upper_case)] if kind == "c" else _python_upper_case()
    done = subprocess.run([*argv, "0", "16"], cwd=work, env=_env(None), capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (work / "out").read_bytes() == TEXT.upper()


def test_status_checkpoint_handshake_trickle_and_finish(program: list[str], tmp_path: Path) -> None:
    work, api_dir = _workdir(tmp_path)
    (api_dir / "resolve").write_text(f"in\t{work / 'in'}\nout\t{work / 'result.txt'}\n")
    proc = subprocess.Popen([*program, "0.05", "8", "3", "trickle"], cwd=work, env=_env(api_dir))
    try:
        fractions: list[float] = []
        _wait_for(lambda: _status(api_dir).get("uses_checkpoints") == 1.0, "uses_checkpoints=1")
        _wait_for(lambda: 0 < _status(api_dir).get("fraction_done", 0) < 1, "a fraction between 0 and 1")
        fractions.append(_status(api_dir)["fraction_done"])
        # The wrapper asks for a checkpoint; the program writes its own and says so, then waits.
        (api_dir / "checkpoint_request").write_text("7\n")
        _wait_for(lambda: (api_dir / "checkpoint_ready").exists(), "checkpoint_ready")
        assert (api_dir / "checkpoint_ready").read_text() == "7\n"
        assert not (api_dir / "critical").exists()
        saved = int((work / "upper_case_state").read_text())
        assert 0 < saved < len(TEXT)
        time.sleep(0.5)  # the program must hold still while the wrapper snapshots
        assert int((work / "upper_case_state").read_text()) == saved
        assert (work / "result.txt").stat().st_size == saved
        assert proc.poll() is None
        (api_dir / "checkpoint_request").unlink()
        _wait_for(lambda: not (api_dir / "checkpoint_ready").exists(), "the program to go on")
        _wait_for(lambda: _status(api_dir).get("fraction_done", 0) > fractions[0], "the fraction to grow")
        assert proc.wait(timeout=WAIT) == 3
    finally:
        proc.kill()
    assert (work / "result.txt").read_bytes() == TEXT.upper()
    assert (api_dir / "finish").read_text() == "3\n"
    status = _status(api_dir)
    assert status["fraction_done"] == 1.0
    assert status["fpops_cumulative"] == len(TEXT) * 1e6
    trickles = sorted((api_dir / "trickle_up").iterdir())
    assert [t.name for t in trickles] == ["00000001.msg"]
    assert trickles[0].read_text() == "upper_case\n<chars>done</chars>"


def test_a_restart_resumes_from_the_checkpoint_file(program: list[str], tmp_path: Path) -> None:
    work, _ = _workdir(tmp_path)
    half = len(TEXT) // 2
    (work / "out").write_bytes(TEXT[:half].upper() + b"garbage after the checkpoint")
    (work / "upper_case_state").write_text(f"{half}\n")
    done = subprocess.run([*program, "0", "16"], cwd=work, env=_env(None), capture_output=True, check=True)
    assert f"resuming at byte {half}".encode() in done.stderr
    assert (work / "out").read_bytes() == TEXT.upper()


C_PROBE = r"""
#include <stdio.h>
#include <string.h>
#include "boinc_api.h"
int main(int argc, char** argv) {
    char buf[64];
    boinc_init();
    if (argc < 2) return 98;
    if (strcmp(argv[1], "standalone") == 0) return boinc_is_standalone();
    if (strcmp(argv[1], "resolve") == 0) {
        int r = boinc_resolve_filename(argv[2], buf, (int)sizeof(buf));
        printf("%s\n", buf);
        return r == 0 ? 0 : 9;
    }
    if (strcmp(argv[1], "critical") == 0) {
        boinc_begin_critical_section();
        boinc_begin_critical_section();
        boinc_end_critical_section();
        printf("%d\n", boinc_time_to_checkpoint());
        fflush(stdout);
        getchar();
        boinc_end_critical_section();
        printf("%d\n", boinc_time_to_checkpoint());
        return 0;
    }
    if (strcmp(argv[1], "down") == 0) {
        int n = 0;
        while (boinc_receive_trickle_down(buf, (int)sizeof(buf))) { printf("[%s]", buf); n++; }
        return n;
    }
    if (strcmp(argv[1], "temporary") == 0) return boinc_temporary_exit(120, "no network yet", true);
    if (strcmp(argv[1], "network") == 0) {
        BOINC_STATUS st;
        boinc_waiting_for_network(true);
        boinc_get_status(&st);
        printf("%d %d\n", boinc_network_poll(), st.network_suspended);
        return 0;
    }
    if (strcmp(argv[1], "need") == 0) return boinc_need_network();
    if (strcmp(argv[1], "done") == 0) {
        boinc_waiting_for_network(true);
        boinc_network_done();
        boinc_network_usage(1.0, 2.0);
        return 0;
    }
    return 99;
}
"""


@pytest.fixture(scope="module")
def c_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.c").write_text(C_PROBE)
    lib, _ = static_library()
    subprocess.run(
        [
            "gcc",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-static",
            "-I",
            str(source("boinc_api.h").parent),
            str(d / "probe.c"),
            "-L",
            str(lib.parent),
            "-lboinc_api",
            "-o",
            str(d / "probe"),
        ],
        check=True,
    )
    return d / "probe"


def test_cpp_programs_compile_against_the_header(tmp_path: Path) -> None:
    (tmp_path / "p.cpp").write_text(
        '#include "boinc_api.h"\n#include <string>\n'
        'int main() { std::string s; boinc_init(); boinc_resolve_filename_s("in", s);'
        " boinc_waiting_for_network(true); boinc_waiting_for_network(false);"
        ' return s == "in" ? boinc_finish(0) : 1; }\n'
    )
    lib, _ = static_library()
    subprocess.run(
        [
            "g++",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-static",
            "-I",
            str(source("boinc_api.h").parent),
            str(tmp_path / "p.cpp"),
            "-L",
            str(lib.parent),
            "-lboinc_api",
            "-o",
            str(tmp_path / "p"),
        ],
        check=True,
    )
    assert subprocess.run([str(tmp_path / "p")], env=_env(None), check=False).returncode == 0


def test_c_resolve_standalone_and_a_too_small_buffer(c_probe: Path, tmp_path: Path) -> None:
    _, api_dir = _workdir(tmp_path)
    (api_dir / "resolve").write_text("in\t/job/input.dat\nlong\t/" + "x" * 100 + "\n")

    def run(*a: str, d: Path | None = api_dir) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(c_probe), *a], env=_env(d), capture_output=True, text=True, check=False)

    assert run("standalone").returncode == 0
    assert run("standalone", d=None).returncode == 1
    assert run("resolve", "in").stdout == "/job/input.dat\n"
    assert run("resolve", "unmapped").stdout == "unmapped\n"
    assert run("resolve", "long").returncode == 9
    assert run("resolve", "in", d=None).stdout == "in\n"


def test_c_critical_sections_nest_and_hold_back_checkpoints(c_probe: Path, tmp_path: Path) -> None:
    _, api_dir = _workdir(tmp_path)
    (api_dir / "checkpoint_request").write_text("1\n")
    p = subprocess.Popen(
        [str(c_probe), "critical"],
        env=_env(api_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.readline() == "0\n"  # inside a section: never time to checkpoint
    assert (api_dir / "critical").exists()
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline() == "1\n"  # outside: due, and in a section again (as BOINC does)
    assert p.wait(timeout=WAIT) == 0


def test_c_trickle_down_oldest_first_and_deleted(c_probe: Path, tmp_path: Path) -> None:
    _, api_dir = _workdir(tmp_path)
    down = api_dir / "trickle_down"
    down.mkdir()
    (down / "b").write_text("second")
    (down / "a").write_text("first")
    (down / "c.tmp").write_text("half written")
    done = subprocess.run(
        [str(c_probe), "down"], env=_env(api_dir), capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout) == (2, "[first][second]")
    assert [p.name for p in down.iterdir()] == ["c.tmp"]


def test_c_temporary_exit(c_probe: Path, tmp_path: Path) -> None:
    _, api_dir = _workdir(tmp_path)
    assert subprocess.run([str(c_probe), "temporary"], env=_env(api_dir), check=False).returncode == 0
    assert (api_dir / "temporary_exit").read_text() == "120\n1\nno network yet\n"


def test_c_waiting_for_network_and_the_older_names(c_probe: Path, tmp_path: Path) -> None:
    _, api_dir = _workdir(tmp_path)

    def run(what: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(c_probe), what], env=_env(api_dir), capture_output=True, text=True, check=False
        )

    got = run("network")  # BOINC's current call; the network is there
    assert (got.returncode, got.stdout) == (0, "0 0\n")
    assert _status(api_dir)["want_network"] == 1.0
    (api_dir / "network_suspended").write_text("1\n")  # the wrapper: the client keeps it off
    assert run("network").stdout == "1 1\n"
    (api_dir / "status").unlink()
    assert run("need").returncode == 0  # the names BOINC's API had before May 2026
    assert _status(api_dir)["want_network"] == 1.0
    assert run("done").returncode == 0
    assert "want_network" not in _status(api_dir)


@pytest.fixture
def shell(api: Path) -> Iterator[object]:
    def run(api_dir: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["busybox", "sh", str(api / "boinc"), *args],
            env=_env(api_dir),
            capture_output=True,
            text=True,
            check=False,
            timeout=WAIT,
        )

    yield run


def test_shell_command(shell: object, tmp_path: Path) -> None:
    assert callable(shell)
    work, api_dir = _workdir(tmp_path)
    (api_dir / "resolve").write_text("in\t/job/in put\n")
    assert shell(None, "standalone").returncode == 0
    assert shell(api_dir, "standalone").returncode == 1
    assert shell(api_dir, "resolve", "in").stdout == "/job/in put\n"
    assert shell(api_dir, "resolve", "other").stdout == "other\n"
    assert shell(api_dir, "fraction-done", "0.25").returncode == 0
    assert shell(api_dir, "ops-cumulative", "5e9", "7").returncode == 0
    assert shell(api_dir, "fraction-done", "0.5").returncode == 0
    assert _status(api_dir) == {"fraction_done": 0.5, "fpops_cumulative": 5e9, "ops_cumulative": 7.0}
    assert shell(api_dir, "fraction-done", "half").returncode == 2
    assert shell(api_dir, "time-to-checkpoint").returncode == 1
    assert _status(api_dir)["uses_checkpoints"] == 1.0
    (api_dir / "checkpoint_request").write_text("4\n")
    assert shell(api_dir, "time-to-checkpoint").returncode == 0
    assert (api_dir / "critical").exists()
    waiter = threading.Thread(target=lambda: shell(api_dir, "checkpoint-completed"))
    waiter.start()
    _wait_for(lambda: (api_dir / "checkpoint_ready").exists(), "checkpoint_ready")
    assert (api_dir / "checkpoint_ready").read_text() == "4\n"
    assert not (api_dir / "critical").exists()
    (api_dir / "checkpoint_request").unlink()
    waiter.join(WAIT)
    assert not waiter.is_alive() and not (api_dir / "checkpoint_ready").exists()
    assert shell(api_dir, "trickle-up", "progress", "<n>1</n>").returncode == 0
    assert shell(api_dir, "trickle-up", "progress", "<n>2</n>").returncode == 0
    assert (api_dir / "trickle_up" / "00000002.msg").read_text() == "progress\n<n>2</n>"
    assert shell(api_dir, "trickle-down").returncode == 1
    (api_dir / "trickle_down").mkdir()
    (api_dir / "trickle_down" / "m1").write_text("<go/>")
    got = shell(api_dir, "trickle-down")
    assert (got.returncode, got.stdout) == (0, "<go/>")
    assert not (api_dir / "trickle_down" / "m1").exists()
    assert shell(api_dir, "temporary-exit", "60", "waiting", "--notice").returncode == 0
    assert (api_dir / "temporary_exit").read_text() == "60\n1\nwaiting\n"
    assert shell(api_dir, "network-suspended").returncode == 1
    (api_dir / "network_suspended").write_text("1\n")
    assert shell(api_dir, "network-suspended").returncode == 0
    assert shell(api_dir, "waiting-for-network", "1").returncode == 0
    assert _status(api_dir)["want_network"] == 1.0
    assert shell(api_dir, "waiting-for-network", "0").returncode == 0
    assert _status(api_dir)["want_network"] == 0.0
    assert shell(api_dir, "waiting-for-network", "maybe").returncode == 2
    assert shell(api_dir, "finish", "3", "bad input").returncode == 3
    assert (api_dir / "finish").read_text() == "3\nbad input\n"
    assert not list(api_dir.glob("*.tmp")) and work.is_dir()


def test_python_module_temporary_exit_and_trickle_down(tmp_path: Path) -> None:
    _, api_dir = _workdir(tmp_path)
    (api_dir / "trickle_down").mkdir()
    (api_dir / "trickle_down" / "x").write_text("<hello/>")
    code = (
        "import boinc\n"
        "assert boinc.boinc_is_standalone() == 0\n"
        "assert boinc.boinc_receive_trickle_down() == '<hello/>'\n"
        "assert boinc.boinc_receive_trickle_down() is None\n"
        "boinc.boinc_begin_critical_section(); boinc.boinc_begin_critical_section()\n"
        "boinc.boinc_end_critical_section()\n"
        "import os; assert os.path.exists(os.path.join(os.environ['BOINCVM_API_DIR'], 'critical'))\n"
        "boinc.boinc_end_critical_section()\n"
        "assert not os.path.exists(os.path.join(os.environ['BOINCVM_API_DIR'], 'critical'))\n"
        "boinc.boinc_waiting_for_network(True)\n"
        "assert boinc.boinc_network_poll() == 0\n"
        "open(os.path.join(os.environ['BOINCVM_API_DIR'], 'network_suspended'), 'w').close()\n"
        "assert boinc.boinc_network_poll() == 1 and boinc.boinc_network_suspended()\n"
        "boinc.boinc_temporary_exit(30, 'later', True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env(api_dir), capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (api_dir / "temporary_exit").read_text() == "30\n1\nlater\n"
    assert _status(api_dir)["want_network"] == 1.0


def test_the_bundled_guest_carries_the_python_module_and_the_shell_command(guest_image: Path) -> None:
    from boincvm.guestapi import GUEST_COMMAND_PATH, GUEST_PYTHON_PATH, SHELL_SCRIPT

    listing = subprocess.run(
        ["cpio", "-t", "--quiet"],
        stdin=(guest_image / "initramfs.cpio").open("rb"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert GUEST_COMMAND_PATH in listing and GUEST_PYTHON_PATH in listing
    extracted = subprocess.run(
        ["cpio", "-i", "--quiet", "--to-stdout", GUEST_COMMAND_PATH],
        stdin=(guest_image / "initramfs.cpio").open("rb"),
        capture_output=True,
        check=True,
    ).stdout
    assert extracted == source(SHELL_SCRIPT).read_bytes()


def test_container_guests_get_the_api_without_touching_the_images_files(tmp_path: Path) -> None:
    from boincvm.image.container import add_guest_api
    from boincvm.image.oci import RootTree

    root = tmp_path / "rootfs"
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/lib/python3/dist-packages").mkdir(parents=True)
    (root / "usr/local/lib/python3.11/site-packages").mkdir(parents=True)
    (root / "usr/local/lib/python3.11/site-packages/boinc.py").write_text("# the image's own\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "usr/lib/python3.9").mkdir(parents=True)
    (root / "usr/lib/python3.9/site-packages").symlink_to(outside)  # a layer's planted link
    tree = RootTree(root=root)
    added = add_guest_api(tree)
    assert added == ["usr/lib/python3/dist-packages/boinc.py", "usr/local/bin/boinc"]
    assert (root / "usr/local/bin/boinc").read_bytes() == source(SHELL_SCRIPT).read_bytes()
    assert (root / "usr/local/bin/boinc").stat().st_mode & 0o777 == 0o755
    assert tree.meta["usr/local/bin/boinc"][1:] == (0, 0)
    assert (root / "usr/local/lib/python3.11/site-packages/boinc.py").read_text() == "# the image's own\n"
    assert list(outside.iterdir()) == []
    # An image with neither bin directory nor Python gets nothing (and no error).
    bare = tmp_path / "bare"
    bare.mkdir()
    assert add_guest_api(RootTree(root=bare)) == []
