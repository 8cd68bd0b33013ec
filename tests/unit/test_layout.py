"""The layout's import rules (docs/architecture.md), read from every module with ``ast``.

Every ``import`` counts, at module level, under ``if TYPE_CHECKING:`` and inside functions:
a circle hidden in a function or behind ``TYPE_CHECKING`` is still a circle. So do imports by
name, ``importlib.import_module("boincvm.x")`` and ``importlib.util.find_spec("boincvm.x")``;
where the name is not written in the call (cli's LazyGroup looks it up in a table), every
string in the module that names a module below ``boincvm`` counts as imported there.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "boincvm"

#: Modules that import nothing above them.
GROUND = {
    "unpacked",
    "errors",
    "proc",
    "xmlio",
    "render",
    "atomicdir",
    "cache",
    "names",
    "findings",
    "hashing",
    "bounds",
    "paths",
}
#: Parts that are made, checked and shipped; they never import a runner.
ARTEFACTS = {
    "job",
    "workunit",
    "appversion",
    "image",
    "package",
    "signing",
    "validate",
    "guestapi",
    "project",
}
#: Parts that run things.
RUNNERS = {"wrapper", "runlocal"}
#: Parts that speak to the outside and import only the ground.
EDGES = {"boinc", "hypervisor"}


@dataclass(frozen=True)
class Import:
    """One import of a boincvm module by another."""

    source: str
    target: str
    line: int
    local: bool  # inside a function

    def __str__(self) -> str:
        where = "a function-local import of" if self.local else "imports"
        return f"{self.source} (line {self.line}) {where} {self.target}"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["boincvm", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _known(name: str) -> str | None:
    """The longest prefix of ``name`` that is a boincvm module."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


#: The calls that import (or look up) a module by name.
_BY_NAME = {"import_module", "find_spec"}


def _by_name(tree: ast.AST, local: set[int]) -> Iterator[tuple[str, int, bool]]:
    """(module name, line, function-local) for each module ``tree`` imports by name."""
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Attribute) and node.func.attr in _BY_NAME)
            or (isinstance(node.func, ast.Name) and node.func.id in _BY_NAME)
        )
    ]
    computed = [c for c in calls if not (c.args and isinstance(c.args[0], ast.Constant))]
    for call in calls:
        arg = call.args[0] if call.args else None
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            yield arg.value, call.lineno, id(call) in local
    if computed:  # the name comes from a table: every module the module names may be imported
        is_local = any(id(c) in local for c in computed)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
                continue
            if node.value.startswith("boincvm.") and node.value in MODULES:
                yield node.value, node.lineno, is_local


def _imports() -> Iterator[Import]:
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        local = {
            id(node)
            for fn in ast.walk(tree)
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(fn)
        }
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    prefix = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    prefix = node.module or ""
                # ``from boincvm.image import elf`` imports the module boincvm.image.elf
                names = [
                    f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names
                ]
            for name in names:
                target = _known(name)
                if target is not None and target != module:
                    yield Import(module, target, node.lineno, id(node) in local)
        for name, line, is_local in _by_name(tree, local):
            target = _known(name)
            if target is not None and target != module:
                yield Import(module, target, line, is_local)


IMPORTS = list(_imports())


def part(module: str) -> str:
    """The part a module belongs to: ``boincvm.workunit.make`` -> ``workunit``; the root -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_is_in_a_known_part() -> None:
    known = GROUND | ARTEFACTS | RUNNERS | EDGES | {"cli", "__main__", ""}
    assert sorted({part(m) for m in MODULES} - known) == []


def test_the_ground_imports_nothing_above_it() -> None:
    bad = [str(i) for i in IMPORTS if part(i.source) in GROUND and part(i.target) not in GROUND | {""}]
    assert bad == []


def test_boinc_and_hypervisor_import_only_the_ground() -> None:
    bad = [
        str(i)
        for i in IMPORTS
        if part(i.source) in EDGES and part(i.target) not in GROUND | {"", part(i.source)}
    ]
    assert bad == []


def test_artefacts_never_import_runners() -> None:
    bad = [str(i) for i in IMPORTS if part(i.source) in ARTEFACTS and part(i.target) in RUNNERS]
    assert bad == []


def test_only_the_cli_reaches_a_real_project() -> None:
    """project/ (deploy into a BOINC project) is for the admin's command line, never the wrapper's."""
    bad = [
        str(i) for i in IMPORTS if part(i.target) == "project" and part(i.source) not in ("cli", "project")
    ]
    assert bad == []


def test_nothing_imports_the_cli() -> None:
    bad = [str(i) for i in IMPORTS if part(i.target) == "cli" and part(i.source) not in ("cli", "__main__")]
    assert bad == []


#: Function-local imports outside cli/ that keep a module out of the wrapper, with the reason.
#: (None today: job rendering, the last one, is its own module, boincvm.job.render, which
#: boincvm.job does not import; the wrapper test below guards that.)
LAZY: dict[tuple[str, str], str] = {}

#: Function-local imports the wrapper makes later, once the BOINC API ticks: the client's first
#: heartbeat is read before they load (about 60 ms sooner), with the reason. The wrapper
#: still loads them, so the wrapper test below follows them.
_AFTER_TICK = "the job, the backends and the steps load once the API ticks"
DEFERRED: dict[tuple[str, str], str] = {
    ("boincvm.wrapper.main", "boincvm.bounds"): _AFTER_TICK,
    ("boincvm.wrapper.main", "boincvm.job"): _AFTER_TICK,
    ("boincvm.wrapper.main", "boincvm.wrapper.steps"): _AFTER_TICK,
    ("boincvm.wrapper.main", "boincvm.findings"): _AFTER_TICK,
    ("boincvm.wrapper.main", "boincvm.hypervisor.base"): _AFTER_TICK,
    (
        "boincvm.wrapper.self_unpack",
        "boincvm.unpacked",
    ): "tarfile and lzma, for the first start on a host only",
}


def test_function_local_imports_only_where_they_say_why() -> None:
    """Outside cli/ (where commands import their core lazily so ``boincvm --help`` is instant),
    a function-local import of boincvm must be an optional part guarded by ``except ImportError``
    or one of :data:`LAZY`, which keep a module out of the wrapper."""
    guarded = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers
            ):
                guarded |= {
                    (module, n.lineno) for n in node.body if isinstance(n, ast.ImportFrom | ast.Import)
                }
    bad = [
        str(i)
        for i in IMPORTS
        if i.local
        and part(i.source) != "cli"
        and (i.source, i.line) not in guarded
        and (i.source, i.target) not in LAZY
        and (i.source, i.target) not in DEFERRED
    ]
    assert bad == []


def test_the_wrapper_never_loads_the_template_engine() -> None:
    """The wrapper ships without jinja2: nothing it imports at module level reaches render,
    neither the ground's nor the job's (the wrapper parses jobs, never renders one)."""
    seen, todo = set(), ["boincvm.wrapper.main"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [
            i.target
            for i in IMPORTS
            if i.source == module and (not i.local or (i.source, i.target) in DEFERRED)
        ]
    assert "boincvm.wrapper.steps" in seen and "boincvm.unpacked" in seen  # the deferred ones are followed
    assert "boincvm.render" not in seen, sorted(seen)
    assert "boincvm.job.render" not in seen, sorted(seen)


#: Modules of the wrapper and the artefacts that import one backend's own modules, with the
#: reason: the code is about that backend's own artefacts. Every other import of the
#: hypervisor from there goes through boincvm.hypervisor.base (DESIGN.md, "Rules").
BACKEND_SPECIFIC = {
    ("boincvm.appversion.build", "boincvm.hypervisor.vmware.files"): "a VMware image is a VM directory",
    ("boincvm.appversion.check", "boincvm.hypervisor.qemu.runtime"): "checks the bundled QEMU archive",
    ("boincvm.appversion.runtime", "boincvm.hypervisor.qemu.runtime"): "builds the bundled QEMU archive",
    (
        "boincvm.appversion.vmware",
        "boincvm.hypervisor.vmware.files",
    ): "VMware VM directories as app files",
    ("boincvm.image.inspect", "boincvm.hypervisor.qemu.backend"): "boots an image to see qemu-ga answer",
    ("boincvm.image.refs", "boincvm.hypervisor.vmware.vmx"): "reads a VMware disk's vmdk descriptor",
    ("boincvm.validate", "boincvm.hypervisor.vmware.inspect"): "checks a VMware VM directory",
}
_INTERFACE = {"boincvm.hypervisor", "boincvm.hypervisor.base"}


def _backend_imports() -> set[tuple[str, str]]:
    return {
        (i.source, i.target)
        for i in IMPORTS
        if part(i.source) in ARTEFACTS | {"wrapper"}
        and part(i.target) == "hypervisor"
        and i.target not in _INTERFACE
    }


def test_the_wrapper_and_the_artefacts_reach_a_backend_through_its_interface() -> None:
    """A concrete backend's modules are imported only where the code is about that backend's
    own artefacts (:data:`BACKEND_SPECIFIC`); the wrapper has no such entry."""
    assert sorted(_backend_imports() - BACKEND_SPECIFIC.keys()) == []
    assert [s for s, _ in BACKEND_SPECIFIC if part(s) == "wrapper"] == []


def test_the_backend_allow_list_names_only_imports_that_exist() -> None:
    """An entry outliving its import would let the next one in unnoticed."""
    assert sorted(BACKEND_SPECIFIC.keys() - _backend_imports()) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_circles_between_modules() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for i in IMPORTS:
        graph[i.source].add(i.target)
    assert _cycles(graph) == []


def test_no_circles_between_parts() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for i in IMPORTS:
        a, b = part(i.source), part(i.target)
        if a != b and b:  # the root package (its __version__) is everyone's
            graph[a].add(b)
    assert _cycles(graph) == []


def test_the_circle_finder_finds_circles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
