"""``boincvm wrapper``: run the wrapper in the current directory (a BOINC slot)."""

from __future__ import annotations

import click

# The core is imported inside the command, not here: the group imports this module to list
# the command, and ``boincvm --help`` stays instant (start-up speed, not an import circle).


@click.command("wrapper", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def command(args: tuple[str, ...]) -> None:
    """Run the wrapper as the BOINC client would start it (for debugging; the app version ships its own)."""
    import signal

    from boincvm.wrapper.main import main

    # The wrapper handles its own signals (SIGTERM stops the VM); the CLI's do not apply.
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    raise SystemExit(main(list(args)))
