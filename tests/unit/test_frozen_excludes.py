"""What the frozen wrapper leaves out is what none of its modules needs.

Every module the frozen wrapper bundles (its sources less what it excludes) is imported in a
fresh interpreter with the excluded standard-library modules blocked: one that needed them
at import would fail here before it failed on a volunteer's host.
"""

from __future__ import annotations

import subprocess
import sys

from boincvm.appversion.frozen import UNUSED_BUNDLED, UNUSED_STDLIB, _excluded_modules
from boincvm.appversion.zipapp import wrapper_sources

_IMPORT_ALL = """
import importlib, sys
blocked, modules = sys.argv[1].split(","), sys.argv[2].split(",")
for name in blocked:
    sys.modules[name] = None
failed = []
for module in modules:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        failed.append(f"{module}: {exc}")
print("\\n".join(failed))
"""


def _bundled_modules() -> list[str]:
    entries, _ = wrapper_sources()
    names = [
        arcname.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        for arcname, _path in entries
        if arcname.endswith(".py")
    ]

    unused = tuple(f"{u}." for u in UNUSED_BUNDLED)
    return [n for n in names if not n.endswith(".__main__") and not f"{n}.".startswith(unused)]


def test_every_bundled_module_imports_without_the_excluded_standard_library() -> None:
    modules = _bundled_modules()
    assert "boincvm.wrapper.main" in modules and "qemu.qmp.protocol" in modules
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, ",".join(UNUSED_STDLIB), ",".join(modules)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == ""


def test_the_spec_excludes_what_the_lists_name() -> None:
    excluded = set(_excluded_modules())
    assert set(UNUSED_STDLIB) <= excluded and set(UNUSED_BUNDLED) <= excluded
    assert not excluded & {"ssl", "_ssl", "_hashlib", "unicodedata", "lzma", "bz2", "pyexpat"}
