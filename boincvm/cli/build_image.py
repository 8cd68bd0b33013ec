"""``boincvm build-image``: build the bundled example guest from Debian packages."""

from __future__ import annotations

import json
from pathlib import Path

import click

# The core is imported inside the command, not here: the group imports this module to list
# the command, and ``boincvm --help`` stays instant (start-up speed, not an import circle).


@click.command("build-image")
@click.option("--recipe", "recipe_name", default="minimal", show_default=True, help="Which guest to build.")
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Image directory to create (default: the content-addressed cache).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the image descriptor as JSON instead of the path."
)
def command(recipe_name: str, output: Path | None, as_json: bool) -> None:
    """Build the example guest (kernel, initramfs with qemu-guest-agent, scratch disk).

    Prints the image directory on stdout; the build is cached by content, so running it
    again is instant.
    """
    from boincvm.cli import console
    from boincvm.image.descriptor import ImageDescriptor
    from boincvm.image.guest import build_guest_image

    image_dir = build_guest_image(recipe_name, output=output, progress=console.info)
    if as_json:
        data = {"path": str(image_dir), **ImageDescriptor.load(image_dir).to_dict()}
        console.out(json.dumps(data, indent=2))
    else:
        console.out(str(image_dir))
