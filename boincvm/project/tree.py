"""A BOINC project directory: recognised, its configuration read, its own tools run.

A project is what BOINC's ``make_project`` made: ``config.xml`` (``<boinc><config>``),
``project.xml`` (apps and platforms for ``bin/xadd``), ``bin/`` with the project's tools,
``apps/``, ``templates/`` and the download hierarchy. boincvm reads the files, runs the tools
from the project's root as the user running boincvm, and never touches the database itself.
"""

from __future__ import annotations

import hashlib
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from boincvm import proc
from boincvm.errors import CommandFailed, InputError
from boincvm.xmlio import parse_xml, read_bytes, text_of

#: The tools deploy runs; all of them are in every BOINC server of the last decade.
TOOLS = ("xadd", "update_versions", "create_work", "dir_hier_path")
#: Where deploy keeps what it submitted (a dot-name: BOINC's tools and web pages ignore it).
LEDGER_DIR = ".boincvm"
#: Generous bounds for the project's tools (update_versions copies and signs big images).
TOOL_TIMEOUT = 3600.0


@dataclass(frozen=True)
class BoincProject:
    """An existing BOINC project directory.

    Attributes:
        root: the project's root (where config.xml is).
        download_dir: the download hierarchy's root (``<download_dir>``).
        fanout: ``<uldl_dir_fanout>`` (0: no hierarchy).
        owner: the name of the user who owns the project directory.
    """

    root: Path
    download_dir: Path
    fanout: int
    owner: str

    @property
    def ledger(self) -> Path:
        """Deploy's own records inside the project."""
        return self.root / LEDGER_DIR

    def app_names(self) -> set[str]:
        """The apps ``project.xml`` declares (what ``bin/xadd`` registers)."""
        path = self.root / "project.xml"
        if not path.exists():
            return set()
        root = parse_xml(read_bytes(path, what="project.xml"), what="the project's project.xml")
        return {text_of(n) for a in root.findall("app") if (n := a.find("name")) is not None}

    def download_path(self, name: str) -> Path:
        """Where a staged file called ``name`` lives (BOINC's ``dir_hier_path``, computed here).

        BOINC hashes the name: the md5's hex digits 2 to 8 as a number, modulo the fan-out, in
        lower-case hex, is the subdirectory. :meth:`checked_download_path` compares this with
        the project's own ``bin/dir_hier_path``.
        """
        if self.fanout == 0:
            return self.download_dir / name
        digest = hashlib.md5(name.encode(), usedforsecurity=False).hexdigest()
        return self.download_dir / f"{int(digest[1:8], 16) % self.fanout:x}" / name

    def tool_download_path(self, name: str) -> Path:
        """``bin/dir_hier_path NAME``: the project's own answer (it also makes the directory)."""
        done = self.run_tool("dir_hier_path", name, timeout=60)
        return Path(done.stdout.decode().strip())

    def run_tool(
        self, tool: str, *args: str, stdin: bytes | None = None, timeout: float = TOOL_TIMEOUT
    ) -> proc.Completed:
        """Run ``bin/TOOL ARGS`` from the project's root.

        Raises:
            CommandFailed: it exited non-zero (its output's last lines in the message).
        """
        try:
            return proc.run([self.root / "bin" / tool, *args], timeout=timeout, input=stdin, cwd=self.root)
        except CommandFailed as exc:
            raise CommandFailed(
                exc.argv,
                exc.returncode,
                exc.stderr_tail,
                message=f"the project's bin/{tool} failed: {_last_line(exc.stderr_tail) or exc.message}",
                hint="its output is above; fix the project and run deploy again "
                "(it resumes where it stopped)",
            ) from None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def open_project(root: Path) -> BoincProject:
    """Recognise a BOINC project directory and read what deploy needs of its config.xml.

    Raises:
        InputError: not a project directory (no config.xml, not a BOINC config, tools missing),
            or run as root in a project another user owns.
    """
    config = root / "config.xml"
    hint = "give the project's root directory, the one BOINC's make_project created (config.xml, bin/, apps/)"
    if not root.is_dir() or not config.is_file():
        raise InputError(f"{root} is not a BOINC project directory (no config.xml)", hint=hint)
    doc = parse_xml(read_bytes(config, what="config.xml"), what=f"{config}")
    cfg = doc.find("config")
    if doc.tag != "boinc" or cfg is None:
        raise InputError(f"{config} is not a BOINC project's config.xml (no <boinc><config>)", hint=hint)
    missing = [t for t in TOOLS if not os.access(root / "bin" / t, os.X_OK)]
    if missing:
        raise InputError(
            f"{root} is not a complete BOINC project: bin/{', bin/'.join(missing)} missing", hint=hint
        )
    download = cfg.find("download_dir")
    fanout = cfg.find("uldl_dir_fanout")
    try:
        fanout_n = int(text_of(fanout)) if fanout is not None else 0
    except ValueError:
        raise InputError(f"{config}: <uldl_dir_fanout> is not a number", hint=hint) from None
    download_dir = Path(text_of(download)) if download is not None else root / "download"
    owner_uid = root.stat().st_uid
    try:
        owner = pwd.getpwuid(owner_uid).pw_name
    except KeyError:
        owner = str(owner_uid)
    if os.geteuid() == 0 and owner_uid != 0:
        raise InputError(
            f"{root} belongs to {owner}, and deploy runs as root: the files it added would be root's, "
            "which the project's daemons and web server cannot change",
            hint=f"run it as the project's owner: runuser -u {owner} -- boincvm deploy ...",
        )
    return BoincProject(root.resolve(), download_dir, fanout_n, owner)
