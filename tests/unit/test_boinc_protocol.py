"""The BOINC protocol pieces on their own: channels, messages, init_data.xml, slot files."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from boincvm.boinc.api import AppOptions, BoincApp
from boincvm.boinc.files import (
    LOCKFILE,
    FinishFile,
    SlotLock,
    TemporaryExit,
    finish_file_text,
    read_finish_file,
    read_temporary_exit,
    resolve_filename,
    temporary_exit_text,
    write_finish_file,
    write_soft_link,
    write_temporary_exit,
)
from boincvm.boinc.init_data import HostInfo, InitData, ProxyInfo, parse_init_data, render_init_data
from boincvm.boinc.shm import (
    MMAP_FILE_NAME,
    SHARED_MEM_SIZE,
    AppChannels,
    AppStatus,
    Channel,
    ClientChannels,
    Control,
    SharedMemory,
    format_app_status,
    format_heartbeat,
    parse_app_status,
    parse_control,
    parse_heartbeat,
)
from boincvm.boinc.slot import escape_project_url, parse_command_line
from boincvm.errors import XmlError


def test_layout_and_channel_semantics(tmp_path: Path) -> None:
    assert SHARED_MEM_SIZE == 8192
    assert [c.offset for c in Channel] == [0, 1024, 2048, 3072, 4096, 5120, 6144, 7168]
    with SharedMemory.create(tmp_path / "boinc_mmap_file") as client, SharedMemory.attach(client.path) as app:
        assert client.send(Channel.HEARTBEAT, "<heartbeat/>")
        assert not client.send(Channel.HEARTBEAT, "second")  # full: not overwritten
        raw = (tmp_path / "boinc_mmap_file").read_bytes()
        assert raw[4096] == 1 and raw[4097:4110] == b"<heartbeat/>\0"
        assert app.receive(Channel.HEARTBEAT) == "<heartbeat/>"
        assert app.receive(Channel.HEARTBEAT) is None  # receiving cleared the flag
        assert client.send(Channel.HEARTBEAT, "x")
        with pytest.raises(ValueError, match="1022"):
            client.send(Channel.APP_STATUS, "y" * 1023)
        assert client.send(Channel.APP_STATUS, "y" * 1022) is True
        client.send_overwrite(Channel.APP_STATUS, "z")
        assert app.receive(Channel.APP_STATUS) == "z"


def test_attach_refuses_short_or_missing_file(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"\0" * 100)
    with pytest.raises(Exception, match="8192"):
        SharedMemory.attach(short)
    with pytest.raises(Exception, match="does not exist"):
        SharedMemory.attach(tmp_path / "none")


def test_messages_are_the_clients_and_apis_own() -> None:
    assert (
        format_heartbeat(0, 2.279274e10)
        == "<heartbeat/><wss>0.000000e+00</wss><max_wss>2.279274e+10</max_wss>"
    )
    beat = parse_heartbeat(format_heartbeat(1e6, 2e9, network_suspended=True))
    assert beat.alive and beat.wss == 1e6 and beat.max_wss == 2e9 and beat.network_suspended
    status = AppStatus(9.167308, 8.181954, 0.306667, other_pid=42, fpops_cumulative=1e12, bytes_sent=10)
    text = format_app_status(status)
    assert text.startswith(
        "<current_cpu_time>9.167308e+00</current_cpu_time>\n"
        "<checkpoint_cpu_time>8.181954e+00</checkpoint_cpu_time>\n"
        "<fraction_done>3.066670e-01</fraction_done>\n"
        "<other_pid>42</other_pid>\n"
        "<bytes_sent>10.000000</bytes_sent>\n"
    )
    assert parse_app_status(text) == status
    # the client's reading: missing CPU times are 0, fraction 0 is "not reported", negatives clamp
    assert (
        parse_app_status("<fraction_done>0</fraction_done><current_cpu_time>-3</current_cpu_time>")
        == AppStatus()
    )
    assert parse_app_status("junk<current_cpu_time> 1.5e1junk") == AppStatus(current_cpu_time=15.0)
    assert parse_control("<quit/>") is Control.QUIT
    assert parse_control("<suspend/><abort/>") == Control.SUSPEND | Control.ABORT
    assert parse_control("nonsense") is Control.NONE
    assert Control.RESUME.tag == "<resume/>"


def test_typed_ends(tmp_path: Path) -> None:
    with SharedMemory.create(tmp_path / "m") as shm:
        client, app = ClientChannels(shm), AppChannels(shm)
        assert client.send_control(Control.SUSPEND)
        assert not client.send_control(Control.RESUME)  # the app has not read the suspend yet
        assert app.receive_control() is Control.SUSPEND
        assert app.receive_control() is Control.NONE
        assert app.send_status(AppStatus(1.0, 0.5, 0.25))
        assert app.status_pending()
        assert client.receive_status() == AppStatus(1.0, 0.5, 0.25)
        assert client.send_heartbeat(1.0, 2.0)
        beat = app.receive_heartbeat()
        assert beat is not None and beat.max_wss == 2.0


def test_init_data_round_trip_and_client_format() -> None:
    data = InitData(
        major_version=7,
        minor_version=20,
        release=5,
        app_version=100,
        app_name="vm & co",
        user_name="Ann <ann>",
        project_dir="/var/lib/boinc/projects/x",
        boinc_dir="/var/lib/boinc",
        wu_name="wu",
        result_name="wu_0",
        shm_key=-1,
        slot=3,
        client_pid=1234,
        wu_cpu_time=8.1,
        checkpoint_period=60,
        ncpus=2,
        rsc_fpops_est=1e12,
        rsc_memory_bound=5e8,
        computation_deadline=1.7e9,
        host_info=HostInfo(p_ncpus=4, p_model="Xeon", m_nbytes=8e9, os_name="Linux"),
        proxy_info=ProxyInfo(use_http_proxy=True, http_server_name="proxy", http_server_port=3128),
        project_preferences="<project_preferences><color>blue</color></project_preferences>",
        app_files=("wrapper_1.00", "job_1.00.xml"),
    )
    text = render_init_data(data)
    parsed = parse_init_data(text)
    assert parsed.global_preferences is not None and "<disk_interval>60.000000<" in parsed.global_preferences
    assert parsed == replace(data, global_preferences=parsed.global_preferences)
    assert parse_init_data(render_init_data(parsed)) == parsed
    lines = text.splitlines()
    assert lines[:3] == [
        "<app_init_data>",
        "<major_version>7</major_version>",
        "<minor_version>20</minor_version>",
    ]
    assert "<shm_key>-1</shm_key>" in lines and "<slot>3</slot>" in lines
    assert "<wu_cpu_time>8.100000</wu_cpu_time>" in lines
    assert "<app_name>vm &amp; co</app_name>" in lines
    assert "    <p_ncpus>4</p_ncpus>" in lines and "    <use_http_proxy/>" in lines
    assert "   <disk_interval>60.000000</disk_interval>" in lines
    assert lines[-3:] == [
        "<app_file>wrapper_1.00</app_file>",
        "<app_file>job_1.00.xml</app_file>",
        "</app_init_data>",
    ]
    assert data.uses_mmap and data.effective_checkpoint_period == 60
    # BOINC defaults for absent tags
    empty = parse_init_data("<app_init_data/>")
    assert (empty.fraction_done_end, empty.gpu_device_num, empty.effective_checkpoint_period) == (
        1.0,
        -1,
        300,
    )


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ("<app_init_data><slot>abc</slot></app_init_data>", "<slot> must be an integer"),
        ("<app_init_data><slot>1</app_init_data>", "not well-formed"),
        ("<other/>", "root <other>"),
        (
            '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
            "<app_init_data><wu_name>&b;</wu_name></app_init_data>",
            "DTD",
        ),
    ],
)
def test_init_data_refuses_bad_documents(doc: str, words: str) -> None:
    with pytest.raises(XmlError, match=words):
        parse_init_data(doc)


def test_resolve_filename(tmp_path: Path) -> None:
    write_soft_link(tmp_path / "in", "../../projects/p/wu_in")
    assert resolve_filename("in", tmp_path) == tmp_path / "../../projects/p/wu_in"
    (tmp_path / "esc").write_text("<soft_link> ../p/a&amp;b </soft_link>\nignored")
    assert resolve_filename("esc", tmp_path) == tmp_path / "../p/a&b"
    (tmp_path / "plain").write_text("just data")
    assert resolve_filename("plain", tmp_path) == tmp_path / "plain"
    assert resolve_filename("missing", tmp_path) == tmp_path / "missing"
    (tmp_path / "real").symlink_to(tmp_path / "in")
    assert resolve_filename("real", tmp_path) == tmp_path / "real"  # a symlink is opened through


def test_finish_and_temporary_exit_files(tmp_path: Path) -> None:
    assert finish_file_text(0) == "0\n"
    assert finish_file_text(3, "bad\ninput", is_notice=True) == "3\nbad input\nnotice\n"
    write_finish_file(tmp_path, 195, "child failed")
    assert read_finish_file(tmp_path) == FinishFile(195, "child failed", False)
    (tmp_path / "boinc_finish_called").write_text("7\nmessage without third line")
    assert read_finish_file(tmp_path) == FinishFile(7, None, False)
    assert read_finish_file(tmp_path / "nowhere") is None

    assert temporary_exit_text(60.9, "VM busy") == "60\nVM busy\n"
    write_temporary_exit(tmp_path, 30, "no hypervisor", is_notice=True)
    assert read_temporary_exit(tmp_path) == TemporaryExit(30, "no hypervisor", True)
    (tmp_path / "boinc_temporary_exit").write_text("99999\nlong\n")
    assert read_temporary_exit(tmp_path) == TemporaryExit(300, "long", False)  # out of range -> 300
    (tmp_path / "boinc_temporary_exit").write_text("60\n")
    assert read_temporary_exit(tmp_path) is None  # no reason: the client ignores the file


def test_lockfile_excludes_another_process(tmp_path: Path) -> None:
    probe = (
        "import sys; from pathlib import Path; from boincvm.boinc.files import SlotLock; "
        "sys.exit(0 if SlotLock(Path(sys.argv[1])).try_acquire() else 9)"
    )
    path = tmp_path / "boinc_lockfile"
    with SlotLock(path) as lock:
        assert lock.try_acquire()
        other = subprocess.run([sys.executable, "-c", probe, str(path)], timeout=30, check=False)
        assert other.returncode == 9
    assert not path.exists()  # released and deleted, as BOINC does
    other = subprocess.run([sys.executable, "-c", probe, str(path)], timeout=30, check=False)
    assert other.returncode == 0


def test_project_url_and_command_line() -> None:
    assert escape_project_url("http://127.0.0.1:31480/boincvm/") == "127.0.0.1_31480_boincvm"
    assert escape_project_url("https://example.org/é/") == "example.org__"
    assert parse_command_line("  --a 1 'two words' \"x y\"  z ") == ["--a", "1", "two words", "x y", "z"]


def test_command_line_empty_quotes_split_as_the_real_client_does() -> None:
    # boinc 7.20.5 gave the guest '" end ' for the workunit command line '"" end'
    # (the client appends a space and the app version's command line).
    assert parse_command_line('x "" end ') == ["x", '" end ']
    assert parse_command_line("x '' y 'z' ") == ["x", "' y ", "z'"]
    assert parse_command_line('"a" "b"') == ["a", "b"]


def _app_with_channel(
    tmp_path: Path, finish_wait: float, status_period: float = 1.0
) -> tuple[BoincApp, ClientChannels]:
    shm = SharedMemory.create(tmp_path / MMAP_FILE_NAME)
    app_side = AppChannels(SharedMemory.attach(tmp_path / MMAP_FILE_NAME))
    init = InitData(slot=0, wu_name="wu", result_name="wu_0")
    app = BoincApp(
        tmp_path,
        init,
        app_side,
        SlotLock(tmp_path / LOCKFILE),
        AppOptions(finish_wait=finish_wait, status_period=status_period),
    )
    return app, ClientChannels(shm)


def test_finish_leaves_the_final_status_for_the_client_to_read_after_the_exit(tmp_path: Path) -> None:
    """The client reads what is left in the channel once the process has exited
    (``handle_exited_app``), so finish puts the final status there and returns: an hour's
    wait allowed, no read, and it returns all the same."""
    app, client = _app_with_channel(tmp_path, finish_wait=3600.0)
    app.report(0.5, cpu_time=2.0)
    assert app.finish(0) == 0
    final = client.receive_status()
    assert final is not None and final.fraction_done == 1.0 and final.current_cpu_time == 2.0
    assert read_finish_file(tmp_path) == FinishFile(0, None, False)


def test_finish_does_not_overwrite_a_status_the_client_has_not_read(tmp_path: Path) -> None:
    """A status still unread holds the channel: finish waits for the client to take it, up to
    finish_wait, and never overwrites it (a reader could see half of each)."""
    app, client = _app_with_channel(tmp_path, finish_wait=0.0, status_period=0.0)
    app.report(0.25, cpu_time=1.0)
    app.tick()  # sends the status message the client will not read
    assert app.finish(0) == 0
    unread = client.receive_status()
    assert unread is not None and unread.fraction_done == 0.25
    assert client.receive_status() is None


def test_the_first_status_goes_one_period_after_the_start(tmp_path: Path) -> None:
    """As BOINC's API: no status at the first tick, so a task shorter than a period finds the
    channel free for its final status."""
    clock = [100.0]
    shm = SharedMemory.create(tmp_path / MMAP_FILE_NAME)
    app_side = AppChannels(SharedMemory.attach(tmp_path / MMAP_FILE_NAME))
    init = InitData(slot=0, wu_name="wu", result_name="wu_0")
    app = BoincApp(tmp_path, init, app_side, SlotLock(tmp_path / LOCKFILE), AppOptions(), lambda: clock[0])
    client = ClientChannels(shm)
    app.tick()
    assert client.receive_status() is None
    clock[0] += 1.0
    app.tick()
    first = client.receive_status()
    assert first is not None and not first.fraction_done  # nothing reported yet
