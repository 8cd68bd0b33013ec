"""``boincvm guest-api``: the BOINC API for programs inside the VM (header, library, Python, shell)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from boincvm.cli.params import DIRECTORY, json_option

# The core is imported inside the command, not here: the group imports this module to list
# the command, and ``boincvm --help`` stays instant (start-up speed, not an import circle).


@click.command("guest-api")
@click.argument("directory", type=DIRECTORY)
@click.option("--force", is_flag=True, help="Replace DIRECTORY whole even if it holds other files.")
@json_option("Print what was written as JSON.")
def command(directory: Path, force: bool, as_json: bool) -> None:
    """Write the guest-side BOINC API into DIRECTORY.

    A BOINCified program built against these files instead of BOINC's API runs unchanged
    inside the VM: boinc_api.h and libboinc_api.a (x86_64, static: gcc prog.c -static -L DIR
    -lboinc_api), boinc.py for Python programs, and the shell command boinc. The bundled
    guest image already carries boinc.py and the boinc command. Running it again on its own
    output rewrites the files; a DIRECTORY with other files is refused without --force.
    """
    from boincvm.cli import console
    from boincvm.guestapi import write_guest_api

    written = write_guest_api(directory, force=force)
    if as_json:
        console.out(
            json.dumps(
                {
                    "directory": str(written.directory),
                    "files": list(written.files),
                    "library_cached": written.library_cached,
                },
                indent=2,
            )
        )
    else:
        console.success(f"wrote {len(written.files)} files: {', '.join(written.files)}")
        console.out(str(written.directory))
