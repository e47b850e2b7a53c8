"""No import cycles among the modules of ``itm_kernels`` and ``itm_models`` (issue 13: one home per op and per model,
layers import only the layers below them), checked statically: every ``import`` / ``from ... import`` statement of
every module, at module level or inside a function (a lazy import hides a cycle, it does not remove it), resolved to
the module it names (``from pkg import name`` counts as an import of ``pkg.name`` where that is a module, else of
``pkg``). The deprecated shim modules (old paths that re-export for one release and warn) are left out: they import
their new homes by design and nothing inside the packages imports them. Also: nothing in ``itm_kernels`` imports
``itm_models``."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("itm_kernels", "itm_models")


def module_files() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def is_deprecated_shim(source: str) -> bool:
    """A shim: its module body warns with DeprecationWarning at import."""
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            if "DeprecationWarning" in ast.unparse(node.value) and "warn" in ast.unparse(node.value.func):
                return True
    return False


@functools.lru_cache(maxsize=None)
def extension_modules() -> frozenset[str]:
    """Compiled modules (``itm_kernels/_C*.so``): leaves of the graph, imported from their package."""
    return frozenset(".".join(p.relative_to(REPO).parent.parts + (p.name.split(".")[0],))
                     for pkg in PACKAGES for p in (REPO / pkg).rglob("*.so"))


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Modules of the two packages that ``name`` (at ``path``) imports anywhere in its body (a compiled extension
    imported from its package, ``from .. import _C``, is an import of the extension, not of the package)."""
    leaves = extension_modules()
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules or sub in leaves else target)
    return {m for m in found if m in modules and m != name}


def import_graph() -> tuple[dict[str, set[str]], set[str]]:
    files = module_files()
    shims = {m for m, p in files.items() if is_deprecated_shim(p.read_text())}
    mods = set(files) - shims
    return {m: imports_of(m, files[m], mods) for m in mods}, shims


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_is_read():
    graph, shims = import_graph()
    assert "itm_kernels._common.dispatch" in graph["itm_kernels.xattn_sim"]
    assert "itm_kernels.ops" in shims and "itm_models.gsmn_config" in shims


def test_no_import_cycles():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_never_import_models():
    graph, _ = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith("itm_models")) for m, deps in graph.items()
           if m.startswith("itm_kernels")}
    assert not {m: d for m, d in bad.items() if d}, bad
