"""The administrator's side of the real-server tests and benchmarks: boincvm run as the project's
owner, workunits made as make-workunit makes them, and readings of the project's database and
files (never of boincvm's own logs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from boincvm import proc
from boincvm.job import VmJob
from boincvm.workunit.make import InputSpec, WorkunitRequest, make_workunits
from tests.boinc_server import BoincServer
from tests.example_hello import CHECKOUT, hello_workunits

APP = "hello"
#: BOINC's result and workunit states (db/boinc_db_types.h).
OVER, SUCCESS, CLIENT_ERROR, VALID, ASSIMILATED = 5, 1, 3, 1, 2


@dataclass(frozen=True)
class Admin:
    """The administrator's side: a project, a place for artefacts, boincvm as the project's owner."""

    server: BoincServer
    work: Path  # artefacts, readable by the project's owner
    toolkit: Path  # boincvm and its libraries where the project's owner can read them

    def deploy(self, *args: str, check: bool = True) -> proc.Completed:
        """``boincvm deploy PROJECT ARGS`` as the project's owner (Debian's python3)."""
        path = f"{self.toolkit / 'src'}:{self.toolkit / 'site-packages'}"
        argv = ["env", f"PYTHONPATH={path}", "NO_COLOR=1", "/usr/bin/python3", "-m", "boincvm"]
        return proc.run(
            self.server.as_user([*argv, "deploy", str(self.server.root), *args]), timeout=1800, check=check
        )

    def workunits(self, directory: str, job: VmJob, inputs: tuple[InputSpec, ...], **kw: object) -> Path:
        """A workunit directory (``make_workunits``, as make-workunit does) in :attr:`work`."""
        out = self.work / directory
        make_workunits(
            WorkunitRequest(app_name=APP, job=job, output_dir=out, inputs=inputs, **kw)  # type: ignore[arg-type]
        )
        return out


def make_toolkit(dest: Path) -> Path:
    """boincvm's source and this environment's libraries, linked (or copied) where the project's
    unprivileged owner can read them: the checkout or the interpreter may lie in root's home."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    for src, name in (
        (CHECKOUT / "boincvm", "src/boincvm"),
        (CHECKOUT / "templates", "src/templates"),
        (site, "site-packages"),
    ):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["cp", "-al", str(src), str(dest / name)], capture_output=True, check=False)
        if done.returncode:
            shutil.rmtree(dest / name, ignore_errors=True)
            shutil.copytree(src, dest / name, symlinks=True)
    return dest


def app_version_ids(server: BoincServer) -> dict[str, int]:
    rows = server.query(
        "SELECT av.plan_class, av.id FROM app_version av JOIN app ON app.id = av.appid "
        f"WHERE app.name = '{APP}' AND av.deprecated = 0"
    )
    return {str(pc or ""): int(i or 0) for pc, i in rows}


def results(server: BoincServer, wu: str) -> list[dict[str, str | None]]:
    cols = (
        "r.id",
        "r.name",
        "r.server_state",
        "r.outcome",
        "r.validate_state",
        "r.exit_status",
        "r.granted_credit",
        "r.hostid",
        "r.app_version_id",
        "r.stderr_out",
    )
    rows = server.query(
        f"SELECT {', '.join(cols)} FROM result r JOIN workunit w ON w.id = r.workunitid "
        f"WHERE w.name = '{wu}' ORDER BY r.id"
    )
    return [dict(zip((c[2:] for c in cols), row, strict=True)) for row in rows]


def workunit(server: BoincServer, wu: str) -> dict[str, str | None]:
    cols = ("canonical_resultid", "assimilate_state", "error_mask", "need_validate")
    rows = server.query(f"SELECT {', '.join(cols)} FROM workunit WHERE name = '{wu}'")
    assert rows, f"no workunit {wu} in the project's database"
    return dict(zip(cols, rows[0], strict=True))


def assimilated(server: BoincServer, *wus: str) -> bool:
    return all(int(w["assimilate_state"] or 0) == ASSIMILATED for w in (workunit(server, n) for n in wus))


def upload(server: BoincServer, result_name: str) -> bytes:
    """The first output file of a result, from the project's upload hierarchy (the transitioner
    names it ``RESULT_r<random>_0``)."""
    (path,) = list((server.root / "upload").glob(f"*/{result_name}_r*_0"))
    return path.read_bytes()


def hello(admin: Admin, directory: str, *, input_path: str | None = None, **options: str) -> Path:
    """The bundled example's workunits for :data:`APP` in the administrator's work directory."""
    return hello_workunits(admin.work, directory, app=APP, input_path=input_path, **options)
