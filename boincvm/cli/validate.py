"""``boincvm validate``: clear verdicts on jobs, templates, workunits, app versions, packages, images."""

from __future__ import annotations

import json
from pathlib import Path

import click

from boincvm.cli import console
from boincvm.cli.params import ANY_PATH, json_option

# The core is imported inside the command, not here: the group imports this module to list
# the command, and ``boincvm --help`` stays instant (start-up speed, not an import circle).


@click.command("validate")
@click.argument("paths", nargs=-1, required=True, type=ANY_PATH)
@click.option("--boot", is_flag=True, help="For images: also boot and wait (bounded) for the guest tools.")
@json_option("Print the reports as JSON on stdout.")
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
def command(paths: tuple[Path, ...], boot: bool, as_json: bool, strict: bool) -> None:
    """Check that each PATH is well-formed and consistent.

    PATH may be a vm job file, an input or output template, a workunit directory, an app version
    directory, a guest package (.rpm, .tar.gz), an image, a container image (OCI layout or docker
    save tarball) or a VMware .vmx/.vmdk. Every path gets a verdict; workunits and app versions
    given together are checked to be for the same app. Exit 0 when all are valid, 4 when any
    has an error, 3 when a path could not be read or placed (see the README's exit codes).
    """
    from boincvm.errors import PathsNotJudged, ValidationFailed
    from boincvm.findings import Severity
    from boincvm.validate import PathKind, validate_paths

    reports = validate_paths(paths, boot=boot)
    bad = 0
    for report in reports:
        failing = [
            f
            for f in report.findings
            if f.severity is Severity.ERROR or (strict and f.severity is Severity.WARNING)
        ]
        bad += bool(failing)
        if not as_json:
            verdict = "valid" if not failing else "INVALID"
            style = "green" if not failing else "bold red"
            console.err.print(f"{report.path}: {report.kind.value}: {verdict}", style=style)
            for f in report.findings:
                colour = {"error": "red", "warning": "yellow", "info": "dim"}[f.severity.value]
                console.err.print(f"  {f.severity.value}: {f.place}: {f.message}", style=colour)
                if f.hint:
                    console.err.print(f"    hint: {f.hint}", style="cyan")
    if as_json:
        console.out(json.dumps([r.as_dict() for r in reports], indent=2))
    unknown = [r for r in reports if r.kind is PathKind.UNKNOWN]
    if unknown:
        first = unknown[0].findings[0]
        many = f"{len(unknown)} of {len(reports)} paths could not be judged; the first: "
        raise PathsNotJudged(
            (many if len(reports) > 1 else "") + first.message,
            [f for r in reports for f in r.findings],
            hint=first.hint,
        )
    if bad:
        raise ValidationFailed(
            f"{bad} of {len(reports)} path{'s' if len(reports) != 1 else ''} failed validation",
            [f for r in reports for f in r.findings],
            hint="fix the errors listed above",
        )
