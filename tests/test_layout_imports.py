"""The package's import graph: no cycle, library code never imports a command, model code imports only torch.

The graph is read from the source (ast), not by importing: an edge A -> B for every `import B` or
`from B import x` that runs when A is imported (module level, including under `if`/`try`, and class bodies;
not inside functions, which run later, nor under `if TYPE_CHECKING`). `from pkg import name` counts as an
import of `pkg.name` when that is a module, else of `pkg`.
"""

import ast
from pathlib import Path

import pytest

import dalle_ds

PKG_ROOT = Path(dalle_ds.__file__).parent
KERNELS_ROOT = PKG_ROOT.parent / "kernels"
MODEL_FILES = (
    "dalle_ds.dvae.model",
    "dalle_ds.dvae.loss",
    "dalle_ds.prior.model",
    "dalle_ds.attention.masks",
    "dalle_ds.attention.layout",
    "dalle_ds.attention.dense",
    "dalle_ds.attention.sparse",
)


def _modules() -> dict[str, Path]:
    """dalle_ds.* module name -> file (kernels/ is installed as dalle_ds.kernels)."""
    out = {}
    for root, prefix in ((PKG_ROOT, "dalle_ds"), (KERNELS_ROOT, "dalle_ds.kernels")):
        for f in root.rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


def _import_time_nodes(tree: ast.AST):
    """Import statements that run at import time (skips function bodies)."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):  # never runs
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve_from(name: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        for node in _import_time_nodes(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                src = _resolve_from(name, node, is_pkg)
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_real_edges():
    """The reader finds known imports (a test that cannot fail is a defect): the prior imports attention."""
    g = import_graph()
    assert "dalle_ds.attention" in g["dalle_ds.prior.model"]
    assert "dalle_ds.cli.common" in g["dalle_ds.cli.train_prior"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    """No two modules of dalle_ds (kernels included) import each other, directly or through others."""
    assert _cycles(import_graph()) == []


def test_library_modules_never_import_a_command():
    """Only dalle_ds.cli.* (and the launcher shims dalle_ds/train_*.py) import dalle_ds.cli."""
    shims = {"dalle_ds.train_prior", "dalle_ds.train_dvae"}
    offenders = {
        m: sorted(t for t in ts if t.startswith("dalle_ds.cli"))
        for m, ts in import_graph().items()
        if not m.startswith("dalle_ds.cli") and m not in shims
    }
    assert {m: ts for m, ts in offenders.items() if ts} == {}


@pytest.mark.parametrize("module", MODEL_FILES)
def test_model_code_imports_only_torch(module):
    """Model files import torch, the standard library and other model/config modules; never DeepSpeed,
    datasets, the training package or a command."""
    path = _modules()[module]
    banned = ("deepspeed", "datasets", "triton", "dalle_ds.training", "dalle_ds.cli", "dalle_ds.data")
    found = []
    for node in _import_time_nodes(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        found += [n for n in names if n.startswith(banned)]
    assert found == []
