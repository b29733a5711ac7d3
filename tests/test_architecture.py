"""The package layout is the architecture: data flows one way through the layers below, and
this test (standard library `ast` only) keeps it so.

Rules, checked on every module under src/batchlab:
- a module imports nothing from a layer above its own (same layer is fine);
- no private name (`_x`) is imported from another module;
- no import cycles between modules (function-level and dynamic `importlib.import_module`
  imports count too: a string naming a batchlab module is an import);
- typer and rich only in the CLI layer (library code reports progress through callbacks);
- no module over 400 lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "batchlab"

# lowest first; a module may import from its own layer and the ones before it
LAYERS = [
    "core",         # batchlab.errors, batchlab.config, batchlab.atomic, batchlab.usercode
    "data",
    "measure",      # math on a model at one point: curvature, per-example gradients, noise scale
    "nn",           # models, optimizers, layer-wise rules, weights on disk
    "probes",
    "engine",       # the training loop and its steppers
    "runs",         # store, checkpoints, train-with-store, sweeps, executors
    "analysis",     # gradient trials, scaling fits, throughput, stored measurements
    "experiments",
    "recommend",
    "report",
    "integrations",  # optional adapters (Lightning)
    "cli",
]
RANK = {name: i for i, name in enumerate(LAYERS)}
MAX_LINES = 400



def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


CORE = {"errors", "config", "atomic", "usercode"}  # top-level modules of the "core" layer
FACADE = {"__main__"}  # with the package itself: sit above everything


def layer(mod: str) -> str | None:
    """The module's layer; "?" for a module that belongs to no layer (a new top-level module
    or package must be given one here)."""
    parts = mod.split(".")
    if len(parts) == 1 or parts[1] in FACADE:
        return None
    if parts[1] in RANK:
        return parts[1]
    return "core" if parts[1] in CORE else "?"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports(path: Path, mod: str, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported batchlab module, imported names) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    out = []
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        dyn = dynamic_import(node)
        if dyn is not None:
            out.append((dyn, []))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] in ("batchlab", "typer", "rich")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] not in ("batchlab", "typer", "rich"):
                continue
            names = [a.name for a in node.names]
            # `from batchlab.measure import curvature` imports the module batchlab.measure.curvature
            sub = [n for n in names if f"{base}.{n}" in known]
            if sub:
                out += [(f"{base}.{n}", []) for n in sub]
            rest = [n for n in names if n not in sub]
            if rest:
                out.append((base, rest))
    return out


def dynamic_import(node: ast.AST) -> str | None:
    """The batchlab module an `importlib.import_module(...)` / `__import__(...)` call names:
    its string constant, or the constant prefix of an f-string (`f"batchlab.probes.{x}"` ->
    the package `batchlab.probes`). None for anything else or a name computed at run time."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    if name not in ("import_module", "__import__"):
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        text = arg.value
    elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        text = str(arg.values[0].value).rstrip(".")
    else:
        return None
    return text if text.split(".")[0] == "batchlab" else None


def resolve(target: str, known: set[str]) -> str | None:
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def violations() -> set[str]:
    mods = modules()
    known = set(mods)
    found: set[str] = set()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        n_lines = len(path.read_text().splitlines())
        if n_lines > MAX_LINES:
            found.add(f"size: {mod} has {n_lines} lines")
        my = layer(mod)
        for target, names in imports(path, mod, known):
            top = target.split(".")[0]
            if top in ("typer", "rich"):
                if my not in (None, "cli"):
                    found.add(f"ui: {mod} imports {top}")
                continue
            dep = resolve(target, known)
            if dep is None or dep == mod:
                continue
            if dep != "batchlab":
                graph[mod].add(dep)
            theirs = layer(dep)
            if my is not None and theirs is not None and RANK[theirs] > RANK[my]:
                found.add(f"upward: {mod} ({my}) imports {dep} ({theirs})")
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    found.add(f"private: {mod} imports {dep}.{n}")
    for cycle in _cycles(graph):
        found.add("cycle: " + " -> ".join(cycle))
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_every_module_has_a_layer() -> None:
    homeless = [mod for mod in modules() if layer(mod) == "?"]
    assert not homeless, f"modules in no layer (add them to LAYERS or CORE): {homeless}"


def test_no_new_architecture_violations() -> None:
    new = sorted(violations())
    assert not new, "architecture violations:\n" + "\n".join(new)


@pytest.mark.parametrize("bad", [
    ("batchlab.data.x", "from batchlab.engine.loop import train_one\n", "upward"),
    ("batchlab.data.x", "import importlib\nimportlib.import_module('batchlab.engine.loop')\n",
     "upward"),
    ("batchlab.data.x", "import importlib\nm = importlib.import_module(f'batchlab.runs.{1}')\n",
     "upward"),
    ("batchlab.engine.x", "from batchlab.engine.fused import _helper\n", "private"),
    ("batchlab.runs.x", "import rich.console\n", "ui"),
    ("batchlab.runs.x", "x = 1\n" * (MAX_LINES + 1), "size"),
    ("batchlab.nn.x", "from batchlab.nn import y\n", "cycle"),
    ("batchlab.nn.y", "import importlib\nimportlib.import_module('batchlab.nn.x')\n", "cycle"),
])
def test_checker_catches(tmp_path: Path, bad: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself can fail: plant one violation of each kind in a copy of the tree
    (the cycle: nn.x imports nn.y statically, nn.y imports nn.x by string)."""
    import shutil

    mod, code, kind = bad
    root = tmp_path / "batchlab"
    shutil.copytree(SRC, root)
    rel = Path(*mod.split(".")[1:]).with_suffix(".py")
    (root / rel).write_text(code)
    if kind == "cycle":  # both halves of the cycle
        other = "batchlab.nn.y" if mod == "batchlab.nn.x" else "batchlab.nn.x"
        back = ("import importlib\nimportlib.import_module('batchlab.nn.x')\n"
                if other == "batchlab.nn.y" else "from batchlab.nn import y\n")
        (root / Path(*other.split(".")[1:]).with_suffix(".py")).write_text(back)
    monkeypatch.setattr(sys.modules[__name__], "SRC", root)
    assert any(v.startswith(kind + ":") and mod in v for v in violations())


def test_a_module_in_no_layer_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    root = tmp_path / "batchlab"
    shutil.copytree(SRC, root)
    (root / "helpers.py").write_text("x = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", root)
    assert layer("batchlab.helpers") == "?"
    with pytest.raises(AssertionError, match="helpers"):
        test_every_module_has_a_layer()
