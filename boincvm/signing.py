"""Code signing the way BOINC does it, with the ``cryptography`` library.

A BOINC client runs only app-version files signed with the project's code-signing key
(``sign_executable``): the signature is RSA PKCS#1 v1.5 type-1 padding over the file's
md5 as 32 lowercase hex characters (the raw bytes, no DigestInfo), with a 1024-bit key,
written as lowercase hex, 32 bytes a line, then ``.``. Keys are stored in BOINC's text
format (``print_key_hex``): the bit count, then the RSAREF key structure in hex, its
numbers big-endian and right-aligned in fixed-width fields.

The private key must never travel with the app version: ``package-image --sign-key``
writes only ``FILE.sig`` files next to the files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from boincvm.bounds import read_text
from boincvm.errors import InputError
from boincvm.hashing import md5_file
from boincvm.paths import refuse_symlinks_in

KEY_BITS = 1024
MODULUS_LEN = KEY_BITS // 8
PRIME_LEN = MODULUS_LEN // 2
PRIVATE_FILE = "code_sign_private"
PUBLIC_FILE = "code_sign_public"


def _hex_block(data: bytes) -> str:
    lines = [data[i : i + 32].hex() for i in range(0, len(data), 32)]
    return "\n".join(lines) + "\n.\n"


def _fixed(value: int, width: int) -> bytes:
    return value.to_bytes(width, "big")


def _parse_block(text: str, what: str) -> tuple[int, bytes]:
    lines = [ln.strip() for ln in text.strip().splitlines()]
    try:
        bits = int(lines[0])
        end = lines.index(".")
        data = bytes.fromhex("".join(lines[1:end]))
    except (IndexError, ValueError):
        raise InputError(
            f"{what} is not a BOINC key file", hint="make keys with 'boincvm keys create DIR'"
        ) from None
    return bits, data


@dataclass(frozen=True)
class KeyPair:
    """A code-signing key pair."""

    private: rsa.RSAPrivateKey

    @property
    def public(self) -> rsa.RSAPublicKey:
        """The public half."""
        return self.private.public_key()


def generate() -> KeyPair:
    """A new 1024-bit key pair (BOINC's size; the client expects it)."""
    return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS))


def private_key_text(key: rsa.RSAPrivateKey) -> str:
    """The private key in BOINC's text format (R_RSA_PRIVATE_KEY)."""
    n = key.private_numbers()
    pub = n.public_numbers
    body = (
        _fixed(pub.n, MODULUS_LEN)
        + _fixed(pub.e, MODULUS_LEN)
        + _fixed(n.d, MODULUS_LEN)
        + _fixed(n.p, PRIME_LEN)
        + _fixed(n.q, PRIME_LEN)
        + _fixed(n.dmp1, PRIME_LEN)
        + _fixed(n.dmq1, PRIME_LEN)
        + _fixed(n.iqmp, PRIME_LEN)
    )
    return f"{KEY_BITS}\n" + _hex_block(body)


def public_key_text(key: rsa.RSAPublicKey) -> str:
    """The public key in BOINC's text format (R_RSA_PUBLIC_KEY), as the scheduler sends it."""
    pub = key.public_numbers()
    return f"{KEY_BITS}\n" + _hex_block(_fixed(pub.n, MODULUS_LEN) + _fixed(pub.e, MODULUS_LEN))


def parse_private_key(text: str, what: str = "private key") -> rsa.RSAPrivateKey:
    """Read a private key in BOINC's text format.

    Raises:
        InputError: not a BOINC private key.
    """
    bits, data = _parse_block(text, what)
    if bits != KEY_BITS or len(data) != 3 * MODULUS_LEN + 5 * PRIME_LEN:
        raise InputError(
            f"{what} is not a {KEY_BITS}-bit BOINC private key",
            hint="give the code_sign_private or code_sign_public that boincvm keys create wrote",
        )
    m = MODULUS_LEN
    fields = [data[0:m], data[m : 2 * m], data[2 * m : 3 * m]]
    fields += [data[3 * m + i * PRIME_LEN : 3 * m + (i + 1) * PRIME_LEN] for i in range(5)]
    n_, e, d, p, q, dmp1, dmq1, iqmp = (int.from_bytes(f, "big") for f in fields)
    try:
        numbers = rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, rsa.RSAPublicNumbers(e, n_))
        return numbers.private_key()
    except ValueError:
        raise InputError(
            f"{what} holds inconsistent RSA numbers",
            hint="give the code_sign_private or code_sign_public that boincvm keys create wrote",
        ) from None


def parse_public_key(text: str, what: str = "public key") -> rsa.RSAPublicKey:
    """Read a public key in BOINC's text format.

    Raises:
        InputError: not a BOINC public key.
    """
    bits, data = _parse_block(text, what)
    if bits != KEY_BITS or len(data) != 2 * MODULUS_LEN:
        raise InputError(
            f"{what} is not a {KEY_BITS}-bit BOINC public key",
            hint="give the code_sign_private or code_sign_public that boincvm keys create wrote",
        )
    n_ = int.from_bytes(data[:MODULUS_LEN], "big")
    e = int.from_bytes(data[MODULUS_LEN:], "big")
    try:
        return rsa.RSAPublicNumbers(e, n_).public_key()
    except ValueError:
        raise InputError(
            f"{what} holds an invalid RSA key",
            hint="give the code_sign_private or code_sign_public that boincvm keys create wrote",
        ) from None


def write_key_pair(directory: Path, pair: KeyPair | None = None) -> tuple[Path, Path]:
    """Write ``code_sign_private`` (mode 0600) and ``code_sign_public`` into ``directory``.

    Raises:
        InputError: a key file exists there already (keys are never overwritten).
    """
    pair = pair or generate()
    refuse_symlinks_in(directory, "key directory")
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / PRIVATE_FILE, directory / PUBLIC_FILE
    for path in (private, public):
        if path.exists() or path.is_symlink():
            raise InputError(
                f"{path} already exists", hint="keys are never overwritten; choose another directory"
            )
    # O_EXCL | O_NOFOLLOW: never through a symlink planted meanwhile, never over a file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    for path, text, mode in (
        (private, private_key_text(pair.private), 0o600),
        (public, public_key_text(pair.public), 0o644),
    ):
        with os.fdopen(os.open(path, flags, mode), "w", encoding="ascii") as f:
            f.write(text)
    return private, public


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """Read a private key file.

    Raises:
        InputError: missing or not a BOINC private key.
    """
    return parse_private_key(read_key_text(path), f"key file {path}")


def read_key_text(path: Path, what: str = "key file") -> str:
    """A key or signature file's text: a small regular ASCII file.

    Raises:
        InputError: missing, not a regular file, too big, or not ASCII.
    """
    return read_text(path, what=what, encoding="ascii", max_bytes=MAX_KEY_BYTES)


#: A 1024-bit key in BOINC's hex format is under 3 KB; a signature under 1 KB.
MAX_KEY_BYTES = 64 * 1024


def _md5_hex(path: Path) -> bytes:
    return md5_file(path)[0].encode("ascii")


def sign_file(path: Path, key: rsa.RSAPrivateKey) -> str:
    """The signature text ``sign_executable`` writes for ``path``."""
    signature = key.sign(_md5_hex(path), padding.PKCS1v15(), utils.NoDigestInfo())
    return _hex_block(signature)


def verify_file(path: Path, signature_text: str, key: rsa.RSAPublicKey) -> bool:
    """Check a signature as the client does (public-decrypt, compare with the md5 hex)."""
    lines = [ln.strip() for ln in signature_text.strip().splitlines() if ln.strip() != "."]
    try:
        signature = bytes.fromhex("".join(lines))
        # The client's check: public-decrypt (PKCS#1 type 1, no DigestInfo) and compare.
        recovered = key.recover_data_from_signature(signature, padding.PKCS1v15(), None)
    except (ValueError, InvalidSignature):
        return False
    return recovered == _md5_hex(path)
