"""``boincvm package-rpm``: a program directory -> a guest package (RPM or tarball)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from boincvm.cli import console
from boincvm.cli.params import DIRECTORY, EXISTING_DIR, EXISTING_FILE, json_option

# The core is imported inside the command, not here: the group imports this module to list
# the command, and ``boincvm --help`` stays instant (start-up speed, not an import circle).


@click.command("package-rpm", context_settings={"show_default": True})
@click.argument("program_dir", type=EXISTING_DIR)
@click.option("--name", required=True, help="Package name.")
@click.option("--version", required=True, help="Package version.")
@click.option("--release", default="1", help="Package release.")
@click.option("--prefix", help="Install directory in the guest [default: /opt/NAME].")
@click.option("--entry-point", help="Program (relative to PROGRAM_DIR) linked as /usr/local/bin/NAME.")
@click.option("--requires", multiple=True, help="RPM dependency (repeatable; busybox rpm ignores them).")
@click.option(
    "--post-install",
    type=EXISTING_FILE,
    help="Shell script run after installing (RPM %post; busybox rpm does not run it).",
)
@click.option("--summary", default="", help="One line describing the package.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["rpm", "tar"]),
    default="rpm",
    help="rpm, or a .tar.gz for guests without rpm.",
)
@click.option(
    "-o",
    "--output-dir",
    "--output",
    "output_dir",
    type=DIRECTORY,
    default=Path(),
    help="Directory the package is written to.",
)
@json_option("Print name, path, md5 and size as JSON on stdout.")
def command(
    program_dir: Path,
    name: str,
    version: str,
    release: str,
    prefix: str | None,
    entry_point: str | None,
    requires: tuple[str, ...],
    post_install: Path | None,
    summary: str,
    fmt: str,
    output_dir: Path,
    as_json: bool,
) -> None:
    """Build a reproducible guest package from PROGRAM_DIR (installed under /opt/NAME).

    The RPM has a gzip payload, which busybox rpm (the bundled guest) and every rpm can
    install; the same directory always gives the same bytes. The package is checked
    afterwards as `boincvm validate` would.
    """
    from boincvm.bounds import read_text
    from boincvm.findings import Severity
    from boincvm.package import PackageFormat, PackageRequest, build_package, check_package

    req = PackageRequest(
        program_dir=program_dir,
        name=name,
        version=version,
        release=release,
        prefix=prefix,
        entry_point=entry_point,
        requires=requires,
        summary=summary,
        format=PackageFormat(fmt),
        post_install=read_text(post_install, what="--post-install script", max_bytes=1024 * 1024)
        if post_install
        else None,
    )
    built = build_package(req, output_dir)
    for f in check_package(built.path, allowed_prefixes=(req.install_prefix + "/", "/usr/local/")):
        if f.severity is not Severity.INFO:
            console.note(f"{f.place}: {f.message}")
    console.success(f"built {built.path} ({built.nbytes} bytes, md5 {built.md5})")
    console.out(json.dumps(built.as_dict(), indent=2) if as_json else str(built.path))
