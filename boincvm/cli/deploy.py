"""``boincvm deploy``: app versions and workunits into a BOINC project, with its own tools."""

from __future__ import annotations

import json
from pathlib import Path

import click

from boincvm.cli import console
from boincvm.cli.params import DIRECTORY, EXISTING, json_option

# The core is imported inside the command, not here: the group imports this module to list
# the command, and ``boincvm --help`` stays instant (start-up speed, not an import circle).


@click.command("deploy")
@click.argument("project", type=DIRECTORY)
@click.argument("paths", nargs=-1, required=True, type=EXISTING)
@click.option("--dry-run", "-n", is_flag=True, help="Show every step; change nothing.")
@json_option("Print the plan and what ran as JSON on stdout.")
def command(project: Path, paths: tuple[Path, ...], dry_run: bool, as_json: bool) -> None:
    """Install app versions and submit workunits into the BOINC project PROJECT.

    PATHS are app version directories (package-image) and workunit directories
    (make-workunit). Everything goes through the project's own tools, run from its root:
    the app added to project.xml and registered (bin/xadd), the plan class merged into
    plan_class_spec.xml, the files version.xml names copied to
    apps/APP/VERSION/PLATFORM[__PLAN_CLASS]/ and registered (bin/update_versions), the
    workunit files staged where bin/dir_hier_path says and the workunits created
    (bin/create_work). What the project has already is skipped, so running it again is
    safe; a failed step undoes the steps before it. Run it as the project's owner.
    """
    from boincvm.project.deploy import plan_deploy
    from boincvm.project.plan import apply

    plan = plan_deploy(project, paths)
    for step in plan.steps:
        mark = "would" if dry_run else "do"
        console.info(
            f"{mark:>5}: {step.what}" if step.needed else f" have: {step.what} (already in the project)"
        )
    ran = () if dry_run else apply(plan, progress=lambda what: console.note(f"running: {what}"))
    if dry_run:
        console.success(f"dry run: {len(plan.needed)} of {len(plan.steps)} steps would run; nothing changed")
    else:
        console.success(
            f"deployed to {plan.project.root}: {len(ran)} steps ran, "
            f"{len(plan.steps) - len(ran)} were done already"
        )
    if as_json:
        console.out(json.dumps({"ok": True, "dry_run": dry_run, **plan.as_dict()}, indent=2))
