"""``boincvm keys``: a project code-signing key pair, and signatures made with it."""

from __future__ import annotations

from pathlib import Path

import click

from boincvm.cli import console
from boincvm.cli.params import DIRECTORY, EXISTING_FILE

# The core is imported inside the command, not here: the group imports this module to list
# the command, and ``boincvm --help`` stays instant (start-up speed, not an import circle).


#: The file ``sign`` signs and ``verify`` checks.
_file_argument = click.argument("file", type=EXISTING_FILE)


@click.group("keys")
def command() -> None:
    """Create and use a BOINC code-signing key pair (keep the private key off the server)."""


@command.command("create")
@click.argument("directory", type=DIRECTORY)
def create(directory: Path) -> None:
    """Write code_sign_private (mode 0600) and code_sign_public into DIRECTORY.

    code_sign_public goes to the project's keys/ directory; keep code_sign_private on an
    offline machine and sign app versions there (package-image --sign-key).
    """
    from boincvm.signing import write_key_pair

    private, public = write_key_pair(directory)
    console.success(f"wrote {private} (0600) and {public}")
    console.out(str(public))


@command.command("sign")
@_file_argument
@click.option("--key", "key_file", type=EXISTING_FILE, required=True, help="code_sign_private")
def sign(file: Path, key_file: Path) -> None:
    """Print FILE's signature as BOINC's sign_executable does (put it in FILE.sig)."""
    from boincvm.signing import load_private_key, sign_file

    console.out(sign_file(file, load_private_key(key_file)).rstrip("\n"))


@command.command("verify")
@_file_argument
@click.option("--key", "key_file", type=EXISTING_FILE, required=True, help="code_sign_public")
@click.option("--signature", "sig_file", type=EXISTING_FILE, help="The signature file [default: FILE.sig].")
def verify(file: Path, key_file: Path, sig_file: Path | None) -> None:
    """Check FILE's signature as the BOINC client does."""
    from boincvm.errors import ValidationFailed
    from boincvm.signing import parse_public_key, read_key_text, verify_file

    key = parse_public_key(read_key_text(key_file), f"key file {key_file}")
    sig = sig_file or file.with_name(file.name + ".sig")
    if not sig.exists():
        raise ValidationFailed(
            f"{sig} does not exist", [], hint="sign with boincvm keys sign or package-image --sign-key"
        )
    if not verify_file(file, read_key_text(sig, "signature file"), key):
        raise ValidationFailed(
            f"{file.name}: the signature does not match",
            [],
            hint="sign again with the project's current private key",
        )
    console.success(f"{file.name}: signature valid")
