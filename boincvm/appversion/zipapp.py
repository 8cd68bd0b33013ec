"""The wrapper as one file: a Python zip application the BOINC client runs as the main program.

It bundles boincvm and the pure-Python libraries the wrapper imports (defusedxml,
qemu.qmp, rpmfile), taken from this installation, with fixed timestamps so the same
sources give the same bytes (and the same md5, so unchanged wrappers are not re-downloaded).
The volunteer's host needs a Python 3.11+ interpreter on PATH; see docs/commands.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import marshal
import zipfile
from pathlib import Path

from boincvm.atomicdir import file_in_place

#: Top-level packages the wrapper needs at run time.
BUNDLED = ("boincvm", "defusedxml", "qemu", "rpmfile")
#: Parts of boincvm the wrapper never imports (the CLI and its rich/click dependencies).
EXCLUDED_PARTS = ("boincvm/cli/",)
ENTRY = "boincvm.wrapper.main:main"
_EPOCH = (1980, 1, 1, 0, 0, 0)

_MAIN = f"""\
# boincvm wrapper: started by the BOINC client in a slot directory.
import sys
if sys.version_info < (3, 11):
    sys.stderr.write("boincvm wrapper: Python 3.11 or newer is needed\\n")
    sys.exit(1)
from {ENTRY.split(":")[0]} import {ENTRY.split(":")[1]}
sys.exit({ENTRY.split(":")[1]}())
"""


def _package_root(name: str) -> Path:
    module = importlib.import_module(name)
    paths = list(getattr(module, "__path__", []))
    if paths:
        return Path(paths[0])
    file = getattr(module, "__file__", None)
    assert file is not None
    return Path(file)


def _pyc(source: bytes, name: str) -> bytes:
    """Bytecode for this Python, as an unchecked-hash .pyc: zipimport loads it without
    recompiling (half the wrapper's start-up) and any other Python version ignores it."""
    code = compile(source, name, "exec", dont_inherit=True)
    flags = 0b01  # hash-based, not checked against the source
    return (
        importlib.util.MAGIC_NUMBER
        + flags.to_bytes(4, "little")
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    )


def wrapper_sources() -> tuple[list[tuple[str, Path]], list[tuple[str, bytes]]]:
    """The files the wrapper is made of: (archive name, source file) pairs, sorted, and the
    generated ``__init__.py`` files that turn namespace packages into regular ones.

    The zip application and the frozen wrapper (:mod:`boincvm.frozen`) are both built from these.
    """
    entries: list[tuple[str, Path]] = []
    extra: list[tuple[str, bytes]] = []
    for name in BUNDLED:
        root = _package_root(name)
        base = root.parent
        if root.is_dir() and not (root / "__init__.py").exists():
            # zipimport does not find namespace packages (qemu.qmp lives in one): make it regular.
            extra.append((f"{name}/__init__.py", b""))
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            rel = path.relative_to(base).as_posix()
            if path.is_dir() or "__pycache__" in rel or path.suffix in (".pyc", ".so", ".pyd"):
                continue
            if any(rel.startswith(part) for part in EXCLUDED_PARTS):
                continue
            entries.append((rel, path))
    return entries, extra


def build_wrapper_zipapp(target: Path) -> Path:
    """Write the wrapper zip application to ``target`` (atomically) and return it."""
    entries, extra = wrapper_sources()
    with file_in_place(target, mode=0o755) as tmp, tmp.open("wb") as raw:
        raw.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            files = [("__main__.py", _MAIN.encode()), *extra]
            for arcname, path in entries:
                source = path.read_bytes()
                files.append((arcname, source))
                if arcname.endswith(".py"):
                    files.append((arcname + "c", _pyc(source, arcname)))
            for arcname, data in files:
                info = zipfile.ZipInfo(arcname, _EPOCH)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
    return target
