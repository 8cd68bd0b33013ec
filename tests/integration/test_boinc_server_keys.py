"""Keys made by ``boincvm keys create`` serve as a real project's code-signing keys.

The other way round (the project's own ``crypt_prog`` key given to ``package-image
--sign-key``) is what tests/integration/test_boinc_server.py runs. Here a fresh project gets
boincvm's public key before any client attaches, and its private key is kept off the
server, as BOINC advises: ``update_versions`` cannot sign anything, so every signature the
client checks is one boincvm made. Debian's client runs the example to a valid, assimilated
result.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.runlocal.real_client import Client
from boincvm.workunit.directory import open_workunit_dir
from tests.boinc_admin import (
    APP,
    SUCCESS,
    VALID,
    Admin,
    assimilated,
    hello,
    make_toolkit,
    results,
)
from tests.boinc_server import BoincServer, running_server
from tests.example_hello import boincvm_cli
from tests.integration.jobs import SCALE, bound

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800 * max(1.0, SCALE))]


@pytest.fixture(scope="module")
def admin() -> Iterator[Admin]:
    with running_server(name="keytest") as server:
        work = server.state / "admin"
        work.mkdir(mode=0o755)
        yield Admin(server, work, make_toolkit(server.state / "toolkit"))


def test_boincvm_keys_serve_as_the_projects_keys(admin: Admin, guest_image: Path, tmp_path: Path) -> None:
    server: BoincServer = admin.server
    offline = tmp_path / "offline-keys"  # the administrator's own machine, not the server
    boincvm_cli("keys", "create", str(offline))
    keys = server.root / "keys"
    (keys / "code_sign_private").unlink()  # kept offline: update_versions can sign nothing
    shutil.copyfile(offline / "code_sign_public", keys / "code_sign_public")
    av = admin.work / "av"
    boincvm_cli(
        "package-image",
        str(guest_image),
        "--app",
        APP,
        "--sign-key",
        str(offline / "code_sign_private"),
        "-o",
        str(av),
    )
    admin.deploy(str(av))
    server.add_daemon(f"sample_trivial_validator -d 3 --app {APP} --sleep_interval 1")
    server.add_daemon(f"sample_dummy_assimilator -d 3 --app {APP} --sleep_interval 1", start=True)
    wu = hello(admin, "wu")
    admin.deploy(str(wu))
    (name,) = [r.name for r in open_workunit_dir(wu).records()]
    auth = server.create_account("keys@example.com", "keys", "keys passwd")
    client = Client(tmp_path / "client", server, authenticator=auth)
    client.start(exit_when_idle=False)
    try:
        server.wait_for("the example assimilated", lambda: assimilated(server, name), timeout=bound(600))
    finally:
        client.stop()
    (done,) = [r for r in results(server, name) if r["outcome"] == str(SUCCESS)]
    assert done["validate_state"] == str(VALID)
    # The client took boincvm's key from the scheduler and checked every signature with it (a
    # file that fails is refused and the task errs): the key it keeps is boincvm's.
    state = (tmp_path / "client" / "client_state.xml").read_text()
    assert (offline / "code_sign_public").read_text().strip() in state
    project_dir = next(p for p in (tmp_path / "client" / "projects").iterdir() if p.is_dir())
    assert any(project_dir.glob("*boincvm-wrapper")), "the client never downloaded the app version"
