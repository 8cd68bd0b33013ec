"""Installing an app version package-image made into a project, with the project's own tools.

Steps, each skipped when the project already has it:

1. the app: added to ``project.xml`` and registered with ``bin/xadd``;
2. the plan class: the app version's ``.plan_class_spec.xml`` entry merged into the project's
   ``plan_class_spec.xml``, every other entry kept as it was;
3. the files: exactly those ``version.xml`` names, their ``.sig`` files and ``version.xml``
   itself, into ``apps/APP/VERSION/PLATFORM[__PLAN_CLASS]/`` (built in a dot-named sibling,
   which ``update_versions`` skips, and renamed into place);
4. ``bin/update_versions``, answered "y"; its output is read for errors (it exits 0 after
   some) and every file must then be in the download directory.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from boincvm.appversion.check import check_app_version
from boincvm.appversion.model import SUMMARY_NAME, parse_version_xml, read_summary, summary_path
from boincvm.appversion.plan_class import ENTRY_NAME as PLAN_CLASS_ENTRY
from boincvm.appversion.plan_class import FILE_NAME as PLAN_CLASS_FILE
from boincvm.atomicdir import write_file_atomically
from boincvm.errors import CommandFailed, InputError
from boincvm.findings import Severity
from boincvm.hashing import md5_file
from boincvm.project.plan import Step, StepKind
from boincvm.project.tree import BoincProject
from boincvm.xmlio import parse_xml, read_bytes, text_of

#: update_versions asks before signing and before adding; deploy answers yes to each.
_YES = b"y\n" * 10_000
#: How update_versions reports a failure it then exits 0 after.
_UPDATE_VERSIONS_ERROR = re.compile(r"^\s*(error\b.*|.*\bnot present\b.*|.*\bdiffer\b.*)$", re.I | re.M)


@dataclass(frozen=True)
class AppVersionSource:
    """An app version directory package-image made, as deploy reads it."""

    directory: Path
    app_name: str
    version: str
    platform: str
    plan_class: str | None
    files: tuple[str, ...]  # every file to copy: version.xml, the files it names, their .sig
    #: md5 and size of each file version.xml names, as package-image recorded them (validate has
    #: checked the files against them), so an installed copy is compared without hashing ours again.
    recorded: dict[str, tuple[str, int]]

    @property
    def platform_dir(self) -> str:
        """BOINC's directory name: ``PLATFORM`` or ``PLATFORM__PLAN_CLASS``."""
        return f"{self.platform}__{self.plan_class}" if self.plan_class else self.platform

    @property
    def physical_names(self) -> tuple[str, ...]:
        """The files version.xml names."""
        return tuple(f for f in self.files if f != "version.xml" and not f.endswith(".sig"))

    def label(self) -> str:
        """How steps name it."""
        return f"{self.app_name} {self.version} {self.platform_dir}"


def read_app_version(directory: Path) -> AppVersionSource:
    """Read and check an app version directory before anything is installed.

    Raises:
        InputError: not an app version package-image made, or ``validate`` finds an error in it.
    """
    recorded = read_summary(directory)
    if not (directory / "version.xml").is_file() or recorded is None:
        raise InputError(
            f"{directory} is not an app version made by boincvm package-image "
            f"(no version.xml and {SUMMARY_NAME})",
            hint="give the directory package-image wrote (-o)",
        )
    errors = [f for f in check_app_version(directory) if f.severity is Severity.ERROR]
    if errors:
        first = errors[0]
        raise InputError(
            f"{directory} is not a valid app version: {first.place}: {first.message}"
            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
            hint=f"'boincvm validate {directory}' lists every problem",
        )
    app, version, platform = (recorded.get(k) for k in ("app_name", "version", "platform"))
    plan = recorded.get("plan_class")
    plan_class = plan if isinstance(plan, str) and plan else None
    if not all(isinstance(v, str) for v in (app, version, platform)):
        raise InputError(
            f"{summary_path(directory)} is not a boincvm app version summary",
            hint="make the app version again",
        )
    vx, _ = parse_version_xml(read_bytes(directory / "version.xml", what="version.xml"))
    files = ["version.xml"]
    for f in vx.files:
        files.append(f.physical_name)
        if (directory / f"{f.physical_name}.sig").is_file():
            files.append(f"{f.physical_name}.sig")
    files_recorded = recorded.get("files")
    known = {
        str(f["physical_name"]): (str(f["md5"]), int(f["nbytes"]))
        for f in (files_recorded if isinstance(files_recorded, list) else [])
        if isinstance(f, dict) and {"physical_name", "md5", "nbytes"} <= f.keys()
    }
    return AppVersionSource(directory, str(app), str(version), str(platform), plan_class, tuple(files), known)


def app_version_steps(project: BoincProject, av: AppVersionSource, apps_added: set[str]) -> list[Step]:
    """The steps that install ``av`` (``apps_added``: apps an earlier step of this deploy adds).

    Raises:
        InputError: the project has this app version with other files, or a plan class of
            that name with another definition (BOINC files are immutable).
    """
    steps = [_app_step(project, av.app_name, apps_added)]
    if (av.directory / PLAN_CLASS_ENTRY).is_file():
        steps.append(_plan_class_step(project, av))
    dest = project.root / "apps" / av.app_name / av.version / av.platform_dir
    copy_needed = not _same_files(av, dest)
    steps.append(
        Step(
            StepKind.APP_VERSION,
            f"copy app version {av.label()} ({len(av.files)} files) to {dest.relative_to(project.root)}",
            copy_needed,
            run=lambda: _copy_app_version(av, dest),
            undo=lambda: shutil.rmtree(dest, ignore_errors=True),
        )
    )
    registered = all((project.download_dir / n).is_file() for n in av.physical_names)
    steps.append(
        Step(
            StepKind.UPDATE_VERSIONS,
            f"bin/update_versions: register {av.label()} "
            "(it also registers any other new app version under apps/)",
            copy_needed or not registered,
            run=lambda: _update_versions(project, av),
        )
    )
    return steps


def _app_step(project: BoincProject, app: str, apps_added: set[str]) -> Step:
    known = app in project.app_names() or app in apps_added
    apps_added.add(app)
    path = project.root / "project.xml"
    old: list[bytes] = []

    def run() -> None:
        data = path.read_bytes() if path.exists() else b"<boinc>\n</boinc>\n"
        old.append(data)
        entry = (
            f"    <app>\n        <name>{app}</name>\n"
            f"        <user_friendly_name>{app}</user_friendly_name>\n    </app>\n"
        )
        write_file_atomically(
            path, _insert_before_last(data, b"</boinc>", entry.encode(), what="project.xml")
        )
        project.run_tool("xadd", timeout=300)

    def undo() -> None:
        if old:
            write_file_atomically(path, old[0])

    return Step(
        StepKind.APP, f"add app {app} to project.xml and register it (bin/xadd)", not known, run, undo
    )


def _insert_before_last(data: bytes, closing: bytes, entry: bytes, *, what: str) -> bytes:
    at = data.rfind(closing)
    if at < 0:
        raise InputError(f"the project's {what} has no {closing.decode()}", hint=f"repair {what}")
    return data[:at] + entry + data[at:]


def _plan_class_step(project: BoincProject, av: AppVersionSource) -> Step:
    entry_text = (av.directory / PLAN_CLASS_ENTRY).read_text(encoding="utf-8")
    start, end = entry_text.find("<plan_class>"), entry_text.rfind("</plan_class>")
    entry = entry_text[start : end + len("</plan_class>")]
    path = project.root / PLAN_CLASS_FILE
    name = av.plan_class or ""
    existing = _plan_class_entries(path)
    if name in existing and existing[name] != _canonical(entry):
        raise InputError(
            f"the project's {PLAN_CLASS_FILE} defines plan class {name!r} otherwise than this app version",
            hint="give this app version another --plan-class, or make the project's entry match",
        )
    old: list[bytes | None] = []

    def run() -> None:
        data = path.read_bytes() if path.exists() else None
        old.append(data)
        base = data if data is not None else b"<plan_classes>\n</plan_classes>\n"
        merged = _insert_before_last(
            base, b"</plan_classes>", f"    {entry}\n".encode(), what=PLAN_CLASS_FILE
        )
        write_file_atomically(path, merged)

    def undo() -> None:
        if old and old[0] is not None:
            write_file_atomically(path, old[0])
        elif old:
            path.unlink(missing_ok=True)

    return Step(
        StepKind.PLAN_CLASS,
        f"add plan class {name} to {PLAN_CLASS_FILE} (the other entries kept)",
        name not in existing,
        run,
        undo,
    )


def _canonical(xml: str) -> str:
    return re.sub(r">\s+<", "><", xml.strip())


def _plan_class_entries(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    text = read_bytes(path, what=PLAN_CLASS_FILE).decode("utf-8", "replace")
    parse_xml(text, what=f"the project's {PLAN_CLASS_FILE}")  # refuse a malformed file early
    out = {}
    for m in re.finditer(r"<plan_class>.*?</plan_class>", text, re.S):
        name = re.search(r"<name>\s*(.*?)\s*</name>", m.group(0), re.S)
        if name:
            out[_text_of_name(name.group(1))] = _canonical(m.group(0))
    return out


def _text_of_name(raw: str) -> str:
    """A plan class name as written between <name> tags (entities decoded)."""
    return text_of(parse_xml(f"<n>{raw}</n>", what="plan class name"))


def _same_files(av: AppVersionSource, dest: Path) -> bool:
    """True if ``dest`` holds exactly ``av``'s files; False if it does not exist.

    Raises:
        InputError: it exists with other files (app versions are immutable).
    """
    if not dest.exists():
        return False
    present = sorted(p.name for p in dest.iterdir() if not p.name.startswith("."))
    same = present == sorted(av.files) and all(_same_file(av, dest / n) for n in av.files)
    if not same:
        raise InputError(
            f"the project already has app version {av.label()} with other files ({dest})",
            hint="BOINC app versions are immutable: package the image again with a new --version",
        )
    return True


def _same_file(av: AppVersionSource, installed: Path) -> bool:
    md5_size = av.recorded.get(installed.name)
    if md5_size is None:  # version.xml and the signatures: small, compared byte for byte
        return filecmp.cmp(installed, av.directory / installed.name, shallow=False)
    return installed.stat().st_size == md5_size[1] and md5_file(installed) == md5_size


def _copy_app_version(av: AppVersionSource, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.boincvm-part")  # a dot-name: update_versions skips it
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    try:
        for name in av.files:
            _link_or_copy(av.directory / name, part / name)
        part.rename(dest)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows (app-version files never change), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        shutil.copymode(src, dst)


def _update_versions(project: BoincProject, av: AppVersionSource) -> None:
    done = project.run_tool("update_versions", stdin=_YES)
    output = done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")
    bad = _UPDATE_VERSIONS_ERROR.search(output)
    if bad:
        raise CommandFailed(
            ["bin/update_versions"],
            done.returncode,
            output,
            message=f"the project's bin/update_versions refused {av.label()}: {bad.group(0).strip()}",
            hint="its output is above; the app version's directory was removed again",
        )
    missing = [n for n in av.physical_names if not (project.download_dir / n).is_file()]
    if missing:
        raise CommandFailed(
            ["bin/update_versions"],
            done.returncode,
            output,
            message=f"bin/update_versions did not register {av.label()}: "
            f"{missing[0]} is not in the download directory",
            hint="its output is above; run bin/update_versions by hand in the project to see why",
        )
