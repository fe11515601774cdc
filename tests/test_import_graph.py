"""The imports between our own modules form a graph without cycles, and none runs back up the layers.

Every ``.py`` of ``builder/``, ``loaders/``, ``processors/`` and ``taskgalaxy.py`` is parsed (not imported):
module-level and function-level imports alike, ``from x import y`` resolved to the module ``x.y`` when that
is one of ours and to ``x`` otherwise, relative imports resolved against the importing package. Imports
under ``if TYPE_CHECKING:`` are for annotations only and never run: they are no edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("builder", "loaders", "processors")

# Layers: an import from a module under the first prefix into one under any of the second is upward.
FORBIDDEN = (
    ("builder", ("loaders", "processors", "taskgalaxy")),
    ("loaders", ("processors", "taskgalaxy")),
    ("processors.llm", ("processors.stages", "processors.pipeline", "processors.session", "processors.simulator")),
    ("processors.simulator", ("processors.stages", "processors.pipeline", "processors.session")),
    ("processors.quality", ("processors.stages",)),
    ("", ("taskgalaxy",)),
)

# Violations another piece of work (the LLM client, the referees, the estimate) is removing: each edge closes
# one cycle below. This list is to be emptied, never extended.
KNOWN: set[tuple[str, str]] = {
}


def module_files() -> dict[str, Path]:
    files = {"taskgalaxy": ROOT / "taskgalaxy.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _under(module: str, prefix: str) -> bool:
    return prefix == "" or module == prefix or module.startswith(prefix + ".")


def import_edges() -> dict[str, set[str]]:
    """Each of our modules → the set of our modules it imports (anywhere in its body)."""
    files = module_files()
    ours = set(files)
    edges: dict[str, set[str]] = {name: set() for name in files}

    def own(name: str) -> str | None:
        # ``a.b.c`` may name a module, or an attribute of module ``a.b``: the longest module prefix wins.
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in ours:
                return candidate
        return None

    for name, path in files.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        annotations_only = type_only(tree)
        for node in ast.walk(tree):
            if node in annotations_only:  # ``if TYPE_CHECKING:`` imports never run: no dependency at run time
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".") if package else []
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # ``from pkg import mod`` names the module pkg.mod; ``from mod import name`` the module mod.
                # A package's own __init__ is not an edge of every import below it (it runs first, as any
                # parent package does), only where an import names it.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in ours else base
                           for alias in node.names]
            for target in targets:
                module = own(target)
                if module is not None and module != name:
                    edges[name].add(module)
    return edges


def type_only(tree: ast.AST) -> set:
    """The import nodes under ``if TYPE_CHECKING:`` in ``tree`` (for annotations only). Computed per tree by the
    caller: a cache keyed by ``id(tree)`` (as it once was) hands a later tree, allocated where a collected one
    lay, the wrong set, and the test failed now and then under the full suite."""
    found = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None) if isinstance(node, ast.If) else None
        named = getattr(test, "id", None) or getattr(test, "attr", None)
        if named == "TYPE_CHECKING":
            for inner in node.body:
                found.update(n for n in ast.walk(inner) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                        found.append(sorted(component))
    return found


def upward_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    bad = []
    for source, targets in edges.items():
        for target in targets:
            for lower, uppers in FORBIDDEN:
                if _under(source, lower) and any(_under(target, upper) for upper in uppers):
                    if not any(_under(source, upper) for upper in uppers):
                        bad.append((source, target))
                        break
    return sorted(bad)


def test_no_import_cycles():
    edges = import_edges()
    for source, target in KNOWN:
        edges.get(source, set()).discard(target)
    found = cycles(edges)
    described = []
    for component in found:
        inside = set(component)
        links = sorted(f"{s} -> {t}" for s in component for t in edges[s] if t in inside)
        described.append(f"{{{', '.join(component)}}}: " + "; ".join(links))
    assert not found, "import cycles:\n" + "\n".join(described)


def test_no_upward_imports():
    edges = import_edges()
    bad = [edge for edge in upward_imports(edges) if edge not in KNOWN]
    assert not bad, "imports that run back up:\n" + "\n".join(f"{s} -> {t}" for s, t in bad)


def test_known_list_holds_only_live_edges():
    edges = import_edges()
    stale = sorted((s, t) for s, t in KNOWN if t not in edges.get(s, set()))
    assert not stale, f"KNOWN lists edges that no longer exist, remove them: {stale}"
