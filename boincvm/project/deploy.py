"""``deploy``: app versions and workunits into a BOINC project, as one plan.

App versions come first (their apps must exist before workunits name them); a workunit
directory is refused unless its app is in the project, or comes with an app version in the
same deploy, and has an app version there: a wrong ``--app`` would otherwise give workunits
that no host is ever sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from boincvm.errors import InputError
from boincvm.project.app_versions import app_version_steps, read_app_version
from boincvm.project.plan import DeployPlan, Step
from boincvm.project.tree import BoincProject, open_project
from boincvm.project.workunits import read_submission, workunit_steps
from boincvm.workunit.directory import SUMMARY_NAME as WORKUNITS_SUMMARY
from boincvm.workunit.directory import open_workunit_dir


def plan_deploy(project_dir: Path, paths: Sequence[Path]) -> DeployPlan:
    """Every step that puts ``paths`` (app version and workunit directories) into the project.

    Nothing is changed here: a dry run shows the plan, :func:`boincvm.project.plan.apply`
    carries it out.

    Raises:
        InputError: not a project; a path that is neither an app version nor a workunit
            directory; an invalid app version; a conflict with what the project has.
    """
    project = open_project(project_dir)
    app_versions, workunits = [], []
    for path in paths:
        if (path / WORKUNITS_SUMMARY).is_file():
            workunits.append(open_workunit_dir(path))
        elif (path / "version.xml").is_file():
            app_versions.append(read_app_version(path))
        else:
            raise InputError(
                f"{path} is neither an app version (package-image) nor a workunit directory (make-workunit)",
                hint="give the directories package-image and make-workunit wrote",
            )
    steps: list[Step] = []
    apps_added: set[str] = set()
    with_versions = {av.app_name for av in app_versions}
    for av in app_versions:
        steps += app_version_steps(project, av, apps_added)
    for wud in workunits:
        _check_app(project, wud.app_name, with_versions, wud.path)
        steps += workunit_steps(project, read_submission(project, wud))
    return DeployPlan(project, tuple(steps))


def _check_app(project: BoincProject, app: str, with_versions: set[str], where: Path) -> None:
    if app in with_versions:
        return
    apps_dir = project.root / "apps" / app
    has_version = apps_dir.is_dir() and any(apps_dir.iterdir())
    if app not in project.app_names() or not has_version:
        known = sorted(project.app_names())
        raise InputError(
            f"the workunits in {where} are for app {app!r}, which has no app version in the project"
            + (f" (it has: {', '.join(known)})" if known else ""),
            hint="deploy an app version of that app in the same command, "
            "or make the workunits with the right --app",
        )
