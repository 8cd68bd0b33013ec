"""Code signing: BOINC's key format, sign_executable's signature, checked against openssl."""

from __future__ import annotations

import hashlib
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from boincvm.errors import InputError
from boincvm.signing import (
    generate,
    load_private_key,
    parse_private_key,
    parse_public_key,
    private_key_text,
    public_key_text,
    sign_file,
    verify_file,
    write_key_pair,
)


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    write_key_pair(d)
    return d


def test_key_files_format_and_mode(pair_dir: Path) -> None:
    private = pair_dir / "code_sign_private"
    public = pair_dir / "code_sign_public"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    lines = public.read_text().splitlines()
    assert lines[0] == "1024"
    assert lines[-1] == "."
    assert all(len(ln) == 64 for ln in lines[1:-1])  # 32 bytes a line, lowercase hex
    assert len("".join(lines[1:-1])) == 2 * 256  # modulus + exponent, 128 bytes each
    assert len("".join(private.read_text().splitlines()[1:-1])) == 2 * (3 * 128 + 5 * 64)


def test_key_text_round_trips() -> None:
    pair = generate()
    again = parse_private_key(private_key_text(pair.private))
    assert again.private_numbers() == pair.private.private_numbers()
    assert parse_public_key(public_key_text(pair.public)).public_numbers() == pair.public.public_numbers()


def test_sign_and_verify(pair_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "wrapper.pyz"
    f.write_bytes(b"#!/usr/bin/env python3\nprint('x')\n")
    key = load_private_key(pair_dir / "code_sign_private")
    sig = sign_file(f, key)
    lines = sig.splitlines()
    assert lines[-1] == "." and len("".join(lines[:-1])) == 256
    public = parse_public_key((pair_dir / "code_sign_public").read_text())
    assert verify_file(f, sig, public)
    f.write_bytes(b"tampered")
    assert not verify_file(f, sig, public)


def test_signature_equals_openssls_raw_pkcs1_type1(pair_dir: Path, tmp_path: Path) -> None:
    """BOINC's sign_file is RSA_private_encrypt(md5 hex, RSA_PKCS1_PADDING): openssl makes the same bytes."""
    key = load_private_key(pair_dir / "code_sign_private")
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    f = tmp_path / "file"
    f.write_bytes(b"some app version file\n" * 100)
    md5hex = tmp_path / "md5hex"
    md5hex.write_text(hashlib.md5(f.read_bytes()).hexdigest())
    out = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-sign",
            "-inkey",
            str(pem),
            "-pkeyopt",
            "rsa_padding_mode:pkcs1",
            "-in",
            str(md5hex),
        ],
        check=True,
        capture_output=True,
    ).stdout
    ours = bytes.fromhex("".join(ln for ln in sign_file(f, key).splitlines() if ln != "."))
    assert ours == out


def test_keys_are_never_overwritten(pair_dir: Path) -> None:
    with pytest.raises(InputError, match="already exists"):
        write_key_pair(pair_dir)


def test_garbage_key_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "code_sign_private"
    bad.write_text("1024\nzz\n.\n")
    with pytest.raises(InputError, match="not a BOINC key"):
        load_private_key(bad)
