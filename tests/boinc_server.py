"""BOINC's real server for the tests: one project on 127.0.0.1, started and stopped by the tests.

The server is built from BOINC's source at a pinned commit by :mod:`tests.boinc_server_build`,
which finds the source in this order: ``$BOINCVM_BOINC_SOURCE`` (a tarball or a checkout
directory); else ``boinc-c5c6cb79b9.tar.xz`` in a ``vendor/`` directory of any sibling
directory of this checkout (``<checkout>/../*/vendor/``), if its sha256 is the pinned one; else a
clone of https://github.com/BOINC/boinc at the pinned commit. The build is cached by content
under ``<cache>/boinc-server/``; ``python -m tests.boinc_server`` builds it (scripts/bootstrap.sh
calls it).

:class:`BoincServer` runs one project made with BOINC's own ``tools/make_project``, with its own
MariaDB (own datadir, socket and port, ``--no-defaults``) and its own Apache (own config with
CGI and mod_php, the project's generated ``PROJECT.httpd.conf`` included) on free ports of
127.0.0.1. The machine's own MariaDB and Apache services are never touched. Everything runs as
the unprivileged :data:`SERVER_USER` (created if missing) under one state directory, and
:meth:`BoincServer.stop` leaves no process of it behind. Needs root (``useradd``, ``setpriv``),
Debian's ``mariadb-server-core``, ``mariadb-client``, ``apache2-bin``, ``libapache2-mod-php``,
``php-cli``, ``php-mysql``, ``php-xml`` and ``python3-mysqldb``: BOINC's Python tools run
``#!/usr/bin/env python``, so a directory holding a ``python`` link to ``/usr/bin/python3`` goes
first on their PATH.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from boincvm import proc
from boincvm.errors import CommandFailed
from tests.boinc_server_build import build_server

#: The unprivileged user every server process runs as.
SERVER_USER = "boincvm-srv"
#: The interpreter BOINC's Python tools need (Debian's, which has MySQLdb from python3-mysqldb).
SYSTEM_PYTHON = Path("/usr/bin/python3")
APACHE_MODULES = Path("/usr/lib/apache2/modules")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

T = TypeVar("T")


# -- running it --------------------------------------------------------------------------

#: config.xml values for quick tests (names from sched/sched_config.cpp): work requests are never
#: "too recent", clients come back within seconds, work is given up on quickly when asked, and
#: the scheduler's log says why it sent (or did not send) each job.
TEST_CONFIG = {
    "min_sendwork_interval": "0",
    "next_rpc_delay": "5",
    "send_result_abort": "1",
    "sched_debug_level": "3",
    "debug_send_job": "1",
    "debug_version_select": "1",
    "max_wus_to_send": "10",
    "daily_result_quota": "1000",
}
#: The daemons a fresh project runs (make_project's feeder and transitioner, polling each second).
DAEMONS = ("feeder -d 3 --sleep_interval 1", "transitioner -d 3 --sleep_interval 1")
#: Apache modules beyond mod_php: prefork (mod_php is not thread-safe), CGI for the scheduler
#: and the upload handler, Alias/ScriptAlias, types, index pages and the ops pages' basic auth.
APACHE_MODULE_NAMES = (
    "mpm_prefork",
    "authz_core",
    "authz_host",
    "authz_user",
    "authn_core",
    "authn_file",
    "auth_basic",
    "alias",
    "mime",
    "dir",
    "cgi",
)


def ensure_user(name: str = SERVER_USER) -> pwd.struct_passwd:
    """The unprivileged server user, created (a system user with no home and no shell) if missing."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    proc.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
        + ["--shell", "/usr/sbin/nologin", name],
        timeout=60,
    )
    return pwd.getpwnam(name)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run the server (empty: nothing)."""
    lacks = [] if os.geteuid() == 0 else ["root (useradd, setpriv)"]
    for tool in ("mariadbd", "mariadb-install-db", "mariadb", "mariadb-admin", "apache2", "php", "setpriv"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            lacks.append(tool)
    if not list(APACHE_MODULES.glob("libphp*.so")):
        lacks.append("mod_php (libapache2-mod-php)")
    if (
        not SYSTEM_PYTHON.exists()
        or proc.run([str(SYSTEM_PYTHON), "-c", "import MySQLdb"], timeout=60, check=False).returncode
    ):
        lacks.append(f"MySQLdb for {SYSTEM_PYTHON} (python3-mysqldb)")
    return lacks


def processes_of(uid: int, under: Path | None = None) -> list[int]:
    """Running process ids of ``uid``; with ``under``, only those whose command line, working
    directory or executable names a path below it. Zombies do not count: ``bin/start``
    double-forks the daemons, so they are init's children, and init reaps them when it will."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if d.stat().st_uid != uid or (d / "stat").read_text().rpartition(")")[2].split()[0] == "Z":
                continue
            if under is not None:
                names = [(d / "cmdline").read_bytes().decode(errors="replace")]
                for link in ("cwd", "exe"):
                    with contextlib.suppress(OSError):
                        names.append(str((d / link).readlink()))
                if not any(str(under) in n for n in names):
                    continue
            found.append(int(d.name))
    return sorted(found)


def _terminate(p: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM the process group of ``p`` (a session leader), SIGKILL it after ``grace`` seconds."""
    if p is None or p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)


def _write_xml(tree: ET.ElementTree[ET.Element], path: Path) -> None:
    """Write ``tree`` over ``path`` in place (its owner kept), indented."""
    ET.indent(tree, "    ")
    path.write_text(ET.tostring(tree.getroot(), encoding="unicode") + "\n")


class BoincServer:
    """One BOINC project made by ``make_project`` with its own MariaDB and Apache on 127.0.0.1.

    ``start()`` it (or use :func:`running_server`), attach clients to :attr:`url` with the
    authenticator :meth:`create_account` returns, ``stop()`` it. All state is below ``state``,
    a directory the :data:`SERVER_USER` owns.
    """

    def __init__(
        self, build: Path, state: Path, *, name: str = "boincvmtest", user: str = SERVER_USER
    ) -> None:
        self.build = build
        self.state = state
        self.name = name
        self.user = ensure_user(user)
        self.host = socket.gethostname().split(".")[0]
        self.web_port = free_port()
        self.db_port = free_port()
        self.db_user = "boincadm"
        self.db_passwd = secrets.token_hex(12)
        self.db_dir = state / "mariadb"
        self.web_dir = state / "apache"
        self.shim = state / "python-shim"
        self._mariadb: subprocess.Popen[bytes] | None = None
        self._apache: subprocess.Popen[bytes] | None = None

    # -- where things are ----------------------------------------------------------------
    @property
    def url(self) -> str:
        """The master URL (what clients attach to)."""
        return f"http://127.0.0.1:{self.web_port}/{self.name}/"

    @property
    def cgi_url(self) -> str:
        """The CGI directory's URL (``cgi`` is the scheduler, ``file_upload_handler`` the uploads)."""
        return f"http://127.0.0.1:{self.web_port}/{self.name}_cgi/"

    @property
    def root(self) -> Path:
        """The project directory (``bin/``, ``config.xml``, ``download/``, ``upload/``, ...)."""
        return self.state / "projects" / self.name

    @property
    def socket_path(self) -> Path:
        """MariaDB's unix socket."""
        return self.db_dir / "mysqld.sock"

    # -- running things ------------------------------------------------------------------
    def _env(self) -> list[str]:
        u = self.user.pw_name
        return ["env", "-i", f"PATH={self.shim}:{SYSTEM_PATH}", f"HOME={self.state}"] + [
            f"USER={u}",
            f"LOGNAME={u}",
            "LANG=C.UTF-8",
        ]

    def as_user(self, argv: list[str]) -> list[str]:
        """``argv`` as the server user, with a clean environment (the python shim first on PATH)."""
        ids = [str(self.user.pw_uid), str(self.user.pw_gid)]
        return ["setpriv", "--reuid", ids[0], "--regid", ids[1], "--init-groups", "--", *self._env(), *argv]

    def run_tool(
        self, *argv: str, timeout: float = 300, input: bytes | None = None, check: bool = True
    ) -> proc.Completed:
        """Run a project tool (``bin/xadd``, ``bin/update_versions``, ...) as the server user in
        the project directory.

        Raises:
            CommandFailed: it exited non-zero (with ``check``) or ran past ``timeout``.
        """
        return proc.run(
            self.as_user(list(argv)),
            cwd=self.root,
            timeout=timeout,
            input=input,
            check=check,
            secrets=[self.db_passwd],
        )

    def _chown(self, path: Path) -> None:
        proc.run(["chown", "-R", f"{self.user.pw_uid}:{self.user.pw_gid}", str(path)], timeout=120)

    def _sql(self, sql: str, *, database: str | None = None, timeout: float = 60) -> proc.Completed:
        """``sql`` as MariaDB's root over the socket (root has no password in our own instance)."""
        argv = ["mariadb", "--no-defaults", f"--socket={self.socket_path}", "-uroot", "--batch"]
        argv += ["--skip-column-names", *(["-D", database] if database else []), "-e", sql]
        return proc.run(argv, timeout=timeout, secrets=[self.db_passwd])

    def query(self, sql: str) -> list[tuple[str | None, ...]]:
        """Rows of a read-only ``sql`` in the project's database (values as text, NULL as None)."""
        out = self._sql(f"SET SESSION TRANSACTION READ ONLY; {sql}", database=self.name).text
        unescape = {"\\n": "\n", "\\t": "\t", "\\0": "\0", "\\\\": "\\"}
        return [
            tuple(
                None if v == "NULL" else re.sub(r"\\[nt0\\]", lambda m: unescape[m.group()], v)
                for v in line.split("\t")
            )
            for line in out.splitlines()
        ]

    def get(self, url: str, *, timeout: float = 60) -> tuple[int, str]:
        """HTTP GET: the status and body (an error status is returned, not raised)."""
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - our own http URL
                return int(r.status), r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    # -- starting and stopping -----------------------------------------------------------
    def start(self) -> BoincServer:
        """Start MariaDB, make the project, start Apache and the daemons (stops all on failure).

        Raises:
            RuntimeError: a prerequisite is missing or a service did not come up.
            CommandFailed: a set-up step failed.
        """
        lacks = missing_prerequisites()
        if lacks:
            raise RuntimeError("BOINC's server cannot run here, missing: " + ", ".join(lacks))
        try:
            self.state.mkdir(parents=True, exist_ok=True)
            os.chown(self.state, self.user.pw_uid, self.user.pw_gid)
            self.state.chmod(0o755)
            self.shim.mkdir(exist_ok=True)
            (self.shim / "python").symlink_to(SYSTEM_PYTHON)
            self._start_mariadb()
            self._make_project()
            self._start_apache()
            self.start_daemons()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_mariadb(self) -> None:
        data = self.db_dir / "data"
        (self.db_dir / "tmp").mkdir(parents=True)
        self._chown(self.db_dir)
        install = ["mariadb-install-db", "--no-defaults", f"--datadir={data}"]
        proc.run(
            self.as_user([*install, "--auth-root-authentication-method=normal", "--skip-test-db"]),
            timeout=300,
        )
        argv = ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={self.socket_path}"]
        argv += [f"--port={self.db_port}", "--bind-address=127.0.0.1", "--skip-name-resolve"]
        argv += [f"--pid-file={self.db_dir / 'mariadbd.pid'}", f"--tmpdir={self.db_dir / 'tmp'}"]
        argv += ["--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=0"]
        log = self.db_dir / "mariadbd.log"
        self._mariadb = proc.spawn(self.as_user(argv), log_file=log, new_session=True)
        ping = ["mariadb-admin", "--no-defaults", f"--socket={self.socket_path}", "-uroot", "ping"]
        self._await_service(
            "MariaDB", self._mariadb, log, lambda: proc.run(ping, timeout=30, check=False).returncode == 0
        )
        who = f"'{self.db_user}'@'%'"
        self._sql(f"CREATE USER {who} IDENTIFIED BY '{self.db_passwd}'; GRANT ALL ON *.* TO {who};")

    def _await_service(
        self, what: str, p: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool], bound: float = 120
    ) -> None:
        end = time.monotonic() + bound
        while not ready():
            if p.poll() is not None or time.monotonic() > end:
                state = "exited" if p.poll() is not None else f"was not ready within {bound:g} s"
                raise RuntimeError(f"{what} {state}: {proc.tail(log.read_bytes())}")
            time.sleep(0.3)

    def _make_project(self) -> None:
        argv = [str(self.build / "tools" / "make_project"), "--srcdir", str(self.build), "--no_query"]
        argv += ["--url_base", f"http://127.0.0.1:{self.web_port}/", "--project_root", str(self.root)]
        argv += ["--project_host", self.host, "--db_host", f"127.0.0.1:{self.db_port}"]
        argv += ["--db_name", self.name, "--db_user", self.db_user, "--db_passwd", self.db_passwd]
        argv += [self.name, f"boincvm test {self.name}"]
        # As root: it reads the build tree in root's cache. The project is then the server user's.
        proc.run([*self._env(), *argv], cwd=self.build / "tools", timeout=600, secrets=[self.db_passwd])
        self._chown(self.root)
        self.set_config(**TEST_CONFIG)
        tree = ET.parse(self.root / "config.xml")
        daemons = tree.getroot().find("daemons")
        assert daemons is not None, "make_project wrote no <daemons>"
        for d in list(daemons):
            daemons.remove(d)
        _write_xml(tree, self.root / "config.xml")
        for cmd in DAEMONS:
            self.add_daemon(cmd)

    def _start_apache(self) -> None:
        d = self.web_dir
        (d / "run").mkdir(parents=True)
        mods = "".join(f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so\n" for m in APACHE_MODULE_NAMES)
        php = sorted(APACHE_MODULES.glob("libphp*.so"))[-1]
        (d / "httpd.conf").write_text(
            f'ServerRoot "{d}"\nServerName 127.0.0.1\nListen 127.0.0.1:{self.web_port}\n'
            f'PidFile "{d}/run/httpd.pid"\nDefaultRuntimeDir "{d}/run"\n'
            f'ErrorLog "{d}/error.log"\nLogLevel warn\n'
            f'LogFormat "%h %t \\"%r\\" %>s %b %D" short\nCustomLog "{d}/access.log" short\n'
            f"{mods}LoadModule php_module {php}\n"
            "StartServers 2\nMinSpareServers 2\nMaxSpareServers 6\nMaxRequestWorkers 40\n"
            "TypesConfig /etc/mime.types\nAddType application/x-httpd-php .php\n"
            "DirectoryIndex index.php index.html\n"
            "<Directory />\n    AllowOverride None\n    Require all denied\n</Directory>\n"
            f'Include "{self.root / self.name}.httpd.conf"\n'
        )
        self._chown(d)
        log = d / "apache2.log"
        self._apache = proc.spawn(
            self.as_user(["apache2", "-f", str(d / "httpd.conf"), "-DFOREGROUND"]),
            log_file=log,
            new_session=True,
        )

        def answers() -> bool:
            with contextlib.suppress(OSError):
                return self.get(f"http://127.0.0.1:{self.web_port}/", timeout=5)[0] > 0
            return False

        self._await_service("Apache", self._apache, log, answers)

    def start_daemons(self) -> None:
        """``bin/start``: the daemons in config.xml that are not running yet."""
        self.run_tool("bin/start", timeout=120)

    def stop_daemons(self) -> None:
        """``bin/stop``: every daemon (the scheduler then answers that the project is down)."""
        self.run_tool("bin/stop", timeout=120)

    def stop(self) -> None:
        """Stop the daemons, Apache and MariaDB; kill whatever of ours is left; drop the shared memory."""
        if (self.root / "bin" / "stop").exists():
            with contextlib.suppress(CommandFailed):
                self.run_tool("bin/stop", timeout=120, check=False)
        _terminate(self._apache, 30)
        _terminate(self._mariadb, 120)
        for _ in range(100):
            left = processes_of(self.user.pw_uid, self.state)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        key = self.config_value("shmem_key")
        if key:
            proc.run(["ipcrm", "-M", key], timeout=30, check=False)

    # -- the project ---------------------------------------------------------------------
    def config_value(self, name: str) -> str | None:
        """A value of config.xml's ``<config>`` (None if unset or no project yet)."""
        with contextlib.suppress(OSError, ET.ParseError):
            return ET.parse(self.root / "config.xml").getroot().findtext(f"config/{name}")
        return None

    def set_config(self, **values: str) -> None:
        """Set values in config.xml's ``<config>`` (the scheduler reads it on every request)."""
        path = self.root / "config.xml"
        tree = ET.parse(path)
        config = tree.getroot().find("config")
        assert config is not None, f"no <config> in {path}"
        for name, value in values.items():
            node = config.find(name)
            if node is None:
                node = ET.SubElement(config, name)
            node.text = value
        _write_xml(tree, path)

    def add_daemon(self, cmd: str, *, start: bool = False) -> None:
        """Add ``cmd`` (a program in ``bin/`` and its arguments, e.g. ``sample_trivial_validator
        -d 3 --app APP --sleep_interval 1``) to config.xml's daemons; ``start`` runs ``bin/start``."""
        path = self.root / "config.xml"
        tree = ET.parse(path)
        daemons = tree.getroot().find("daemons")
        assert daemons is not None, f"no <daemons> in {path}"
        ET.SubElement(ET.SubElement(daemons, "daemon"), "cmd").text = cmd
        _write_xml(tree, path)
        if start:
            self.start_daemons()

    def create_account(self, email: str, name: str, passwd: str) -> str:
        """A new account through the web RPC ``create_account.php``; its authenticator.

        Raises:
            RuntimeError: the project refused (its XML error in the message).
        """
        passwd_hash = hashlib.md5((passwd + email.lower()).encode(), usedforsecurity=False).hexdigest()
        query = urllib.parse.urlencode({"email_addr": email, "passwd_hash": passwd_hash, "user_name": name})
        status, body = self.get(f"{self.url}create_account.php?{query}")
        found = re.search(r"<authenticator>([^<]+)</authenticator>", body)
        if status != 200 or not found:
            raise RuntimeError(f"create_account.php refused ({status}): {body[:2000]}")
        return found.group(1)

    def log_dir(self) -> Path:
        """The project's ``log_HOST`` directory (daemons' and the scheduler's logs)."""
        return self.root / f"log_{self.host}"

    def scheduler_log(self) -> str:
        """What the scheduler CGI logged so far."""
        p = self.log_dir() / "scheduler.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def diagnostics(self, lines: int = 30) -> str:
        """The tails of every log (for a failed test's message)."""
        logs = [self.web_dir / "error.log", self.db_dir / "mariadbd.log", *sorted(self.log_dir().glob("*"))]
        parts = [f"== {p}\n{proc.tail(p.read_bytes(), lines)}" for p in logs if p.is_file()]
        return "\n".join(parts)

    def alive(self) -> bool:
        """Whether MariaDB and Apache are still running."""
        return all(p is not None and p.poll() is None for p in (self._mariadb, self._apache))

    def wait_for(
        self, what: str, predicate: Callable[[], T], *, timeout: float = 300, interval: float = 1.0
    ) -> T:
        """Poll ``predicate`` (a DB query, usually) until it returns something true; that value.

        ``timeout`` only bounds a hang: a test decides by the state it waits for, never by time.

        Raises:
            TimeoutError: not within ``timeout`` seconds, or a service died (logs in the message).
        """
        end = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if not self.alive() or time.monotonic() > end:
                why = "a service died" if not self.alive() else f"not within {timeout:g} s"
                raise TimeoutError(f"waiting for {what}: {why}\n{self.diagnostics()}")
            time.sleep(interval)


@contextlib.contextmanager
def running_server(*, name: str = "boincvmtest", build: Path | None = None) -> Iterator[BoincServer]:
    """A started :class:`BoincServer` in a fresh state directory; stopped and removed afterwards."""
    build = build or build_server()
    user = ensure_user()
    state = Path(tempfile.mkdtemp(prefix="boincvm-server-"))
    server = BoincServer(build, state, name=name, user=user.pw_name)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    print(build_server())
