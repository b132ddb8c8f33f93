"""The package's imports run one way: no cycle, counting imports inside functions.

Every ``import`` / ``from ... import`` statement of every module is read from its source
(wherever it stands: module level or inside a function), resolved to the package's modules,
and the graph is searched for a cycle. Importing ``a.b.c`` imports the package ``a.b``
first, so that edge counts too (the root package, the public facade, is left out).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = "constrained_sparsity"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _targets(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that ``name`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # "from pkg import sub" imports the module pkg.sub when there is one
            candidates = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate in modules:
                found.add(candidate)
    # Importing a.b.c imports the package a.b first, unless the importing module lies in a.b
    # (its own packages are initialised before it). The root package is the facade: left out.
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    with_parents = set()
    for target in found:
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
            with_parents.add(".".join(parts[:i]))
    return with_parents - own


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _targets(name, path, modules) for name, path in modules.items() if name != PACKAGE}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert f"{PACKAGE}.training.run" in graph and f"{PACKAGE}.methods.l0" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles_through_function_level_imports(tmp_path):
    # the check itself: a cycle made by an import inside a function is found
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    src = tmp_path / PACKAGE
    (src / "sub").mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "sub" / "__init__.py").write_text("")
    (src / "one.py").write_text("from .sub import two\n")
    (src / "sub" / "two.py").write_text("def f():\n    from ..one import f\n")
    modules = {_module_name_at(p, tmp_path): p for p in src.rglob("*.py")}
    graph = {n: _targets(n, p, modules) for n, p in modules.items() if n != PACKAGE}
    assert graph[f"{PACKAGE}.sub.two"] == {f"{PACKAGE}.one"}
    assert find_cycle(graph) is not None


def _module_name_at(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Imports run one way: methods -> problem -> training -> runs -> cli.
LAYERS = ["methods", "problem", "training", "runs", "cli"]


@pytest.mark.parametrize("lower", LAYERS[:-1])
def test_imports_run_one_way(lower):
    graph = import_graph()
    above = {f"{PACKAGE}.{name}" for name in LAYERS[LAYERS.index(lower) + 1 :]}
    for module, targets in graph.items():
        if module == f"{PACKAGE}.{lower}" or module.startswith(f"{PACKAGE}.{lower}."):
            wrong = sorted(t for t in targets if any(t == a or t.startswith(f"{a}.") for a in above))
            assert not wrong, f"{module} imports {wrong}, which sit above it"
