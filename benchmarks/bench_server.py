"""BOINC's real server: its build, a batch through it to two real clients, and how quickly work flows.

Printed:
- the server build from BOINC's source: cold (a fresh tree, ``make -j2``; skipped with
  ``--quick``) and cached (the lookup that finds the cached tree);
- the test project's start (MariaDB, make_project, Apache, daemons) and ``deploy`` of the app
  version (``update_versions``);
- a batch of hello workunits with quorum 2 (every workunit runs twice) through the server to
  two real clients at once (Debian 12's 7.20.5 here, Debian 11's 7.16.16 in the bare root),
  from ``deploy`` to the last workunit assimilated, against run-local running the same tasks
  one after another on this machine, and the ratio;
- from ``create_work`` (the end of ``deploy``) to the task's start in a client's slot, with the
  client told to ask at once (``boinccmd --project URL update``), over several rounds;
- scheduler request latency: the host client's own last scheduler request posted again to the
  scheduler CGI, over several rounds.

Figures are min / median / max. This machine runs QEMU under TCG (nested KVM fails here): the
tasks' own run time is TCG's; the server's figures do not depend on it.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boincvm.image.guest import build_guest_image  # noqa: E402
from boincvm.runlocal.emulator import run_local  # noqa: E402
from boincvm.runlocal.real_client import Client  # noqa: E402
from boincvm.runlocal.request import RunLocalRequest  # noqa: E402
from boincvm.workunit.directory import open_workunit_dir  # noqa: E402
from tests.bare_host import BareHost, build_root  # noqa: E402
from tests.boinc_admin import APP, Admin, assimilated, hello, make_toolkit  # noqa: E402
from tests.boinc_server import BoincServer, running_server  # noqa: E402
from tests.boinc_server_build import build_server, find_source, make_server  # noqa: E402
from tests.example_hello import boincvm_cli

TIMEOUT = 1800.0


def _fmt(values: list[float], unit: str = "s") -> str:
    scale = 1000.0 if unit == "ms" else 1.0
    low, mid, high = (v * scale for v in (min(values), statistics.median(values), max(values)))
    return f"{low:.2f} / {mid:.2f} / {high:.2f} {unit} (min / median / max of {len(values)})"


def _until(what: str, ready: Callable[[], object], timeout: float = TIMEOUT, interval: float = 0.1) -> float:
    t0 = time.perf_counter()
    while not ready():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{what} not within {timeout:g} s")
        time.sleep(interval)
    return time.perf_counter() - t0


def _builds(quick: bool) -> None:
    source = find_source()
    if not quick:
        with tempfile.TemporaryDirectory(prefix="bench-boinc-build-") as tmp:
            t0 = time.perf_counter()
            make_server(source, Path(tmp) / "boinc", jobs=2)
            print(f"   server build, cold (make -j2): {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    build_server(source)
    print(
        f"   server build, cached: {(time.perf_counter() - t0) * 1000:.1f} ms "
        "(the source identified, the tree found)"
    )


def _clients(server: BoincServer, work: Path) -> list[Client[BoincServer]]:
    bare = BareHost.copy_of(build_root(), work / "bare")
    clients = []
    for name, host in (("debian12", None), ("debian11", bare)):
        auth = server.create_account(f"{name}@example.com", name, f"{name} passwd")
        if host is None:
            clients.append(Client(work / name, server, authenticator=auth))
        else:
            clients.append(Client(host.data_dir(name), server, authenticator=auth, launcher=host.launcher))
    for c in clients:
        c.start(exit_when_idle=False)
    return clients


def _batch(admin: Admin, n: int) -> Path:
    rows = admin.work / "rows"
    rows.mkdir()
    for i in range(n):
        (rows / f"n{i}.txt").write_text(f"volunteer {i}\n")
    (admin.work / "batch.csv").write_text("file\n" + "".join(f"rows/n{i}.txt\n" for i in range(n)))
    return hello(
        admin,
        "wu-batch",
        batch=str(admin.work / "batch.csv"),
        name="batch_{{ index }}",
        min_quorum="2",
        target_nresults="2",
        input_path="{{ file }}",
    )


def _run_local_all(wu: Path, av: Path, work: Path, replicas: int) -> float:
    t0 = time.perf_counter()
    for r, rec in enumerate(open_workunit_dir(wu).records()):
        for k in range(replicas):
            summary = run_local(
                RunLocalRequest(
                    workunit_dir=wu,
                    app_version_dir=av,
                    results_dir=work / f"local-{r}-{k}",
                    data_dir=work / "local-data",
                    workunit=rec.name,
                )
            )
            assert summary.ok, summary.message
    return time.perf_counter() - t0


def _first_start(admin: Admin, clients: list[Client[BoincServer]], rounds: int) -> list[float]:
    server = admin.server
    took = []
    for i in range(rounds):
        wu = hello(admin, f"wu-start-{i}", name=f"start_{i}")
        admin.deploy(str(wu))
        t0 = time.perf_counter()
        for c in clients:
            c.cmd("--project", server.url, "update")

        def started(name: str = f"start_{i}") -> bool:
            return any(
                f"<wu_name>{name}</wu_name>" in p.read_text(errors="replace")
                for c in clients
                for p in (c.dir / "slots").glob("*/init_data.xml")
            )

        _until("the task's start", started, interval=0.05)
        took.append(time.perf_counter() - t0)
        _until("the task assimilated", lambda: assimilated(server, f"start_{i}"), interval=0.5)  # noqa: B023
    return took


def _scheduler_latency(server: BoincServer, client: Client[BoincServer], rounds: int) -> list[float]:
    (request,) = list(client.dir.glob("sched_request_*.xml"))
    body = request.read_bytes()
    took = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        req = urllib.request.Request(f"{server.cgi_url}cgi", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - our own http URL
            reply = r.read()
        took.append(time.perf_counter() - t0)
        assert b"<scheduler_reply>" in reply, reply[:500]
    return took


def main(quick: bool = False) -> None:
    n, rounds = (6, 3) if quick else (20, 5)
    print(f"== bench_server: BOINC's own server (TCG guests; {n} workunits, quorum 2)")
    _builds(quick)
    image = build_guest_image("minimal")
    t0 = time.perf_counter()
    with running_server(name="bench") as server:
        print(
            "   test project started (MariaDB, make_project, Apache, daemons): "
            f"{time.perf_counter() - t0:.1f} s"
        )
        server.set_config(one_result_per_host_per_wu="1")
        work = server.state / "admin"
        work.mkdir(mode=0o755)
        admin = Admin(server, work, make_toolkit(server.state / "toolkit"))
        av = work / "av"
        key = server.root / "keys" / "code_sign_private"
        boincvm_cli("package-image", str(image), "--app", APP, "--sign-key", str(key), "-o", str(av))
        t0 = time.perf_counter()
        admin.deploy(str(av))
        print(f"   deploy of the app version (xadd, update_versions): {time.perf_counter() - t0:.1f} s")
        server.add_daemon(f"sample_bitwise_validator -d 3 --app {APP} --sleep_interval 1")
        server.add_daemon(f"sample_dummy_assimilator -d 3 --app {APP} --sleep_interval 1", start=True)
        clients = _clients(server, Path(tempfile.mkdtemp(prefix="bench-clients-", dir=server.state)))
        try:
            wu = _batch(admin, n)
            t0 = time.perf_counter()
            admin.deploy(str(wu))
            names = [r.name for r in open_workunit_dir(wu).records()]
            _until("the batch assimilated", lambda: assimilated(server, *names), interval=0.5)
            served = time.perf_counter() - t0
            local = _run_local_all(wu, av, work, replicas=2)
            print(
                f"   batch of {n} x 2 tasks: real server, two clients {served:.1f} s; run-local, one "
                f"after another {local:.1f} s; ratio server / run-local {served / local:.2f}"
            )
            print(
                f"   create_work to the task's start in a slot: {_fmt(_first_start(admin, clients, rounds))}"
            )
            latency = _scheduler_latency(server, clients[0], rounds * 4)
            print(f"   scheduler request (the client's own, posted again): {_fmt(latency, 'ms')}")
        finally:
            for c in clients:
                c.stop()


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
