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

from boincvm.errors import InputError

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
        raise InputError(f"{what} is not a {KEY_BITS}-bit BOINC private key")
    m = MODULUS_LEN
    fields = [data[0:m], data[m : 2 * m], data[2 * m : 3 * m]]
    fields += [data[3 * m + i * PRIME_LEN : 3 * m + (i + 1) * PRIME_LEN] for i in range(5)]
    n_, e, d, p, q, dmp1, dmq1, iqmp = (int.from_bytes(f, "big") for f in fields)
    try:
        numbers = rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, rsa.RSAPublicNumbers(e, n_))
        return numbers.private_key()
    except ValueError:
        raise InputError(f"{what} holds inconsistent RSA numbers") from None


def parse_public_key(text: str, what: str = "public key") -> rsa.RSAPublicKey:
    """Read a public key in BOINC's text format.

    Raises:
        InputError: not a BOINC public key.
    """
    bits, data = _parse_block(text, what)
    if bits != KEY_BITS or len(data) != 2 * MODULUS_LEN:
        raise InputError(f"{what} is not a {KEY_BITS}-bit BOINC public key")
    n_ = int.from_bytes(data[:MODULUS_LEN], "big")
    e = int.from_bytes(data[MODULUS_LEN:], "big")
    try:
        return rsa.RSAPublicNumbers(e, n_).public_key()
    except ValueError:
        raise InputError(f"{what} holds an invalid RSA key") from None


def write_key_pair(directory: Path, pair: KeyPair | None = None) -> tuple[Path, Path]:
    """Write ``code_sign_private`` (mode 0600) and ``code_sign_public`` into ``directory``.

    Raises:
        InputError: a key file exists there already (keys are never overwritten).
    """
    pair = pair or generate()
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / PRIVATE_FILE, directory / PUBLIC_FILE
    for path in (private, public):
        if path.exists():
            raise InputError(
                f"{path} already exists", hint="keys are never overwritten; choose another directory"
            )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(private_key_text(pair.private))
    public.write_text(public_key_text(pair.public), encoding="ascii")
    return private, public


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """Read a private key file.

    Raises:
        InputError: missing or not a BOINC private key.
    """
    try:
        return parse_private_key(path.read_text(encoding="ascii"), f"key file {path}")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read key file {path}: {exc}") from None


def _md5_hex(path: Path) -> bytes:
    from boincvm.workunit import md5_file

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
