"""The package's imports point down its layers only, and no module imports itself back through others.

Every module of ``hf_paged`` belongs to one layer (ground, bookkeeping, execution, scale-out, engine, front doors);
a module may import its own layer and those below, never above (imports under ``if TYPE_CHECKING:`` are type hints
and do not count there); no cycle, type hints included. Imports inside functions count.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_paged"

# Bottom to top; a module is in the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("hf_paged.envs", "hf_paged.config", "hf_paged.cpu_runtime", "hf_paged.models",
                "hf_paged.detokenizer", "hf_paged.admission")),
    ("bookkeeping", ("hf_paged.core",)),
    ("execution", ("hf_paged.execution",)),
    ("scale-out", ("hf_paged.distributed",)),
    ("engine", ("hf_paged.engine",)),
    ("front doors", ("hf_paged", "hf_paged.api", "hf_paged.streaming", "hf_paged.integrations", "hf_paged.auto",
                     "hf_paged.cli", "hf_paged.demo", "hf_paged.serve", "hf_paged.loading")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    return found


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def imports_of(path: Path, modules: set[str], type_hints: bool = False) -> set[str]:
    """The hf_paged modules ``path`` imports (a name imported from a package counts as its submodule if it is one);
    with ``type_hints``, those imported for type checking only too."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skipped = set() if type_hints else _type_checking_blocks(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hf_paged"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hf_paged"):
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & modules
            found.update(subs or {target})
    return {m for m in found if m != name}


def graph(type_hints: bool = False) -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules, type_hints) & modules for p in paths}


def test_every_module_has_a_layer():
    assert [m for m in graph() if layer_of(m) is None] == []


def test_imports_point_down():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in graph().items() for t in sorted(targets)
              if layer_of(m) is not None and layer_of(t) is not None and layer_of(t) > layer_of(m)
              and not m.startswith(t + ".") and m != "hf_paged"]
    assert upward == []


def test_no_import_cycles():
    edges = graph(type_hints=True)  # a cycle through type hints alone is still a cycle
    # A package's __init__ importing its own submodules is how packages re-export; the reverse edge is the cycle.
    edges = {m: {t for t in ts if not m.startswith(t + ".") and not t.startswith(m + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target] if target in stack else [node, target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []
