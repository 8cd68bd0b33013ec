"""BOINC's real server, built from source, answers on 127.0.0.1 and the real client attaches to it.

The server (tests/boinc_server.py) runs its own MariaDB and Apache as an unprivileged user;
this test checks the pieces a later test builds on: the master page names the scheduler, the
scheduler CGI answers, the web RPC ``create_account.php`` makes an account, and Debian's client,
attached with that account, makes a scheduler RPC that leaves a ``host`` row for the user.
After the server stops, no process of its user is left.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.runlocal.real_client import Client
from tests.boinc_server import SERVER_USER, BoincServer, ensure_user, processes_of, running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def server() -> Iterator[BoincServer]:
    """A started project (the server build is cached; the first run builds it, minutes)."""
    with running_server(name="smoke") as s:
        yield s
    assert processes_of(ensure_user(SERVER_USER).pw_uid) == [], "a server process outlived stop()"


def test_the_scheduler_answers(server: BoincServer) -> None:
    status, master = server.get(server.url)
    assert status == 200, master
    assert f'<link rel="boinc_scheduler" href="{server.cgi_url}cgi">' in master
    status, reply = server.get(f"{server.cgi_url}cgi")
    assert status == 200, reply
    assert "<scheduler_reply>" in reply
    assert "feeder not running" not in reply, server.diagnostics()


def test_a_real_client_attaches(server: BoincServer, tmp_path: Path) -> None:
    auth = server.create_account("smoke@example.com", "smoke", "correct horse")
    ((userid,),) = server.query(f"SELECT id FROM user WHERE authenticator = '{auth}'")
    client = Client(tmp_path / "client", server, authenticator=auth)
    client.start(exit_when_idle=False)
    try:
        hosts = server.wait_for(
            "the client's scheduler RPC (a host row for its user)",
            lambda: server.query(f"SELECT id, rpc_seqno, p_ncpus FROM host WHERE userid = {userid}"),
            timeout=300,
        )
    finally:
        client.stop()
    assert len(hosts) == 1, hosts
    assert f"Request: [USER#{userid}] [HOST#{hosts[0][0]}]" in server.scheduler_log()
