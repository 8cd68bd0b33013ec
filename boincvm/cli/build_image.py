"""``boincvm build-image``: build the bundled example guest from Debian packages."""

from __future__ import annotations

import json
from pathlib import Path

import click

from boincvm.cli.params import DIRECTORY, EXISTING, json_option

# The core is imported inside the command, not here: the group imports this module to list
# the command, and ``boincvm --help`` stays instant (start-up speed, not an import circle).


@click.command("build-image")
@click.option("--recipe", "recipe_name", default="minimal", show_default=True, help="Which guest to build.")
@click.option(
    "--output", type=DIRECTORY, help="Image directory to create (default: the content-addressed cache)."
)
@click.option(
    "--from-oci",
    type=EXISTING,
    help="Build the guest from a container image: an OCI layout directory or a docker/podman save tarball.",
)
@click.option(
    "--max-root-size",
    default="32G",
    show_default=True,
    help="With --from-oci: refuse images whose layers unpack to more than this (K, M, G suffixes).",
)
@json_option("Print the image descriptor as JSON instead of the path.")
def command(
    recipe_name: str, output: Path | None, from_oci: Path | None, max_root_size: str, as_json: bool
) -> None:
    """Build the example guest (kernel, initramfs with qemu-guest-agent, scratch disk).

    With --from-oci, the guest runs a container image instead: its layers become an ext4
    root disk, its Entrypoint, Cmd, Env, WorkingDir and User the job's defaults.

    Prints the image directory on stdout; the build is cached by content, so running it
    again is instant.
    """
    from boincvm.cli import console
    from boincvm.image.descriptor import ImageDescriptor
    from boincvm.image.guest import build_guest_image

    if from_oci is not None:
        from boincvm.bounds import parse_size
        from boincvm.image.container import build_container_image

        text = max_root_size.strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:].upper(), 1)
        digits = text[:-1] if scale > 1 else text
        limit = parse_size(digits, "--max-root-size") * scale
        image_dir = build_container_image(
            from_oci, output=output, progress=console.info, max_root_bytes=limit
        )
    else:
        image_dir = build_guest_image(recipe_name, output=output, progress=console.info)
    if as_json:
        data = {"path": str(image_dir), **ImageDescriptor.load(image_dir).to_dict()}
        console.out(json.dumps(data, indent=2))
    else:
        console.out(str(image_dir))
