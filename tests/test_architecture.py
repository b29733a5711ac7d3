"""The package layout is the architecture: data flows one way through the layers below, and
this test (standard library `ast` only) keeps it so.

Rules, each a pure function of a package folder that returns its violations:
- `homeless`: every module belongs to a layer (a new top-level module or package gets one here);
- `upward`: a module imports nothing from a layer above its own (same layer is fine);
- `private`: no private name (`_x`) is imported from another module;
- `ui`: typer and rich only in the CLI layer (library code reports progress through callbacks);
- `cycles`: no import cycles between modules;
- `oversize`: no module over 400 lines.

An import is any `import` statement (function-level ones too) and any dynamic import that
names a batchlab module: `importlib.import_module(...)` / `__import__(...)` called on a string
constant, on a name bound in the same file to a literal (`for mod in ("batchlab.cli.x", ...)`)
or a subscript of one (`_LAZY = {"Store": "batchlab.runs.store"}`, `_LAZY[name]`), or on an
f-string: `f"batchlab.experiments.{REGISTRY[name]}"` imports the modules the literal REGISTRY
names, `f"batchlab.probes.{name}"` may import any module under `batchlab.probes`, so it
counts as importing all of them. A name imported from a package that loads it lazily
through such a dict (`from batchlab import Store`) imports the module the dict names.
Why: a lazy import is still a dependency; reading only `import` statements let two modules
import each other, one by string, unnoticed.

Each rule is proven able to fail on a small planted package (`test_planted_violation`); the
real package must come out exactly as `ALLOWED` (empty: nothing is tolerated).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
CORE = {"errors", "config", "atomic", "usercode", "task"}  # top-level modules of the "core" layer
FACADE = {"__main__"}  # with the package itself: sit above everything
UI = ("typer", "rich")
MAX_LINES = 400

# Violations the real package is allowed to keep, each with why; the test requires the
# package's violations to equal this set, so an entry that is fixed must be removed.
ALLOWED: set[str] = set()


def layer(mod: str) -> str | None:
    """The module's layer; None for the package facade; "?" for a module in no layer."""
    parts = mod.split(".")
    if len(parts) == 1 or parts[1] in FACADE:
        return None
    if parts[1] in RANK:
        return parts[1]
    return "core" if parts[1] in CORE else "?"


@dataclass(frozen=True)
class Module:
    name: str
    lines: int
    # (imported module, names imported from it); batchlab targets are resolved to a module of
    # the package, typer/rich ones kept as written
    imports: tuple[tuple[str, tuple[str, ...]], ...]


@functools.cache
def scan(root: Path) -> dict[str, Module]:
    """Every module of the package in `root` (a folder named after the package) with its
    imports. Cached: the rules each read the same scan."""
    paths = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    known = set(paths)
    trees = {mod: ast.parse(path.read_text()) for mod, path in paths.items()}
    found = {mod: list(_imports(trees[mod], mod, path.name == "__init__.py", known, root.name))
             for mod, path in paths.items()}
    lazy = {mod: _lazy_attributes(tree, known) for mod, tree in trees.items()}
    for imports in found.values():  # `from batchlab import Store`: the module the facade loads it from
        imports += [(lazy[dep][n], ()) for dep, names in list(imports) if dep in lazy
                    for n in names if n in lazy[dep]]
    return {mod: Module(mod, len(path.read_text().splitlines()), tuple(found[mod]))
            for mod, path in paths.items()}


def _imports(tree: ast.AST, mod: str, is_pkg: bool, known: set[str], top: str
             ) -> Iterable[tuple[str, tuple[str, ...]]]:
    bound = _string_bindings(tree)
    pkg = mod if is_pkg else mod.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_import_call(node):
            for text in _named(node.args[0], bound, known):
                if text.split(".")[0] == top and (dep := _resolve(text, known)):
                    yield dep, ()
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in UI:
                    yield a.name, ()
                elif a.name.split(".")[0] == top and (dep := _resolve(a.name, known)):
                    yield dep, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                keep = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(keep + ([base] if base else []))
            first = base.split(".")[0]
            if first in UI:
                yield base, ()
                continue
            if first != top:
                continue
            names = [a.name for a in node.names]
            # `from batchlab.measure import curvature` imports the module batchlab.measure.curvature
            for n in names:
                if f"{base}.{n}" in known:
                    yield f"{base}.{n}", ()
            rest = tuple(n for n in names if f"{base}.{n}" not in known)
            if rest and (dep := _resolve(base, known)):
                yield dep, rest


def _is_import_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call) or not node.args:
        return False
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in ("import_module", "__import__")


def _lazy_attributes(tree: ast.AST, known: set[str]) -> dict[str, str]:
    """name -> module for names a package loads lazily through a literal dict that an import
    call is subscripted with (`_PUBLIC = {"Store": "batchlab.runs.store"}` and
    `importlib.import_module(_PUBLIC[name])` in its `__getattr__`)."""
    dicts: dict[str, dict[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            pairs = {k.value: v.value for k, v in zip(node.value.keys, node.value.values)
                     if isinstance(k, ast.Constant) and isinstance(k.value, str)
                     and isinstance(v, ast.Constant) and isinstance(v.value, str)}
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    dicts[t.id] = pairs
    used = {n.args[0].value.id for n in ast.walk(tree) if _is_import_call(n)
            and isinstance(n.args[0], ast.Subscript) and isinstance(n.args[0].value, ast.Name)}
    return {k: dep for d in used for k, v in dicts.get(d, {}).items()
            if (dep := _resolve(v, known)) and "." in dep}


def _string_bindings(tree: ast.AST) -> dict[str, set[str]]:
    """name -> the string constants of every literal bound to it anywhere in the file (an
    assignment, or the iterable of a `for`/comprehension); for a dict, its values."""
    out: dict[str, set[str]] = {}

    def bind(target: ast.AST, value: ast.AST | None) -> None:
        if isinstance(target, ast.Name) and value is not None:
            items = value.values if isinstance(value, ast.Dict) else [value]
            strs = {n.value for v in items if v is not None for n in ast.walk(v)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            out.setdefault(target.id, set()).update(strs)

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                bind(t, node.value)
        elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)):
            bind(node.target, node.value)
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            bind(node.target, node.iter)
    return out


def _named(arg: ast.AST, bound: dict[str, set[str]], known: set[str]) -> set[str]:
    """The module names an import call's argument may hold (empty when computed at run time)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return {arg.value}
    if isinstance(arg, ast.Name):
        return bound.get(arg.id, set())
    if isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name):
        return bound.get(arg.value.id, set())
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = str(arg.values[0].value)
        if not prefix.endswith("."):
            return {prefix}
        rest = arg.values[1:]
        if len(rest) == 1 and isinstance(rest[0], ast.FormattedValue):
            tails = _named(rest[0].value, bound, known)  # f"batchlab.experiments.{REGISTRY[name]}"
            if tails:
                return {prefix + t for t in tails}
        pkg = prefix.rstrip(".")  # any module under the package
        return {m for m in known if m == pkg or m.startswith(prefix)}
    return set()


def _resolve(target: str, known: set[str]) -> str | None:
    """The module `target` lives in (`batchlab.x.y.Name` -> `batchlab.x.y`)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def _deps(root: Path) -> Iterable[tuple[Module, str, tuple[str, ...]]]:
    """(module, batchlab module it imports, names) with self-imports and the bare package
    (which every import passes through) left out."""
    for m in scan(root).values():
        for dep, names in m.imports:
            if dep.split(".")[0] not in UI and dep not in (m.name, root.name):
                yield m, dep, names


# --- the rules ---------------------------------------------------------------------------


def homeless(root: Path) -> set[str]:
    return {f"layer: {mod} is in no layer" for mod in scan(root) if layer(mod) == "?"}


def upward(root: Path) -> set[str]:
    out = set()
    for m, dep, _ in _deps(root):
        mine, theirs = layer(m.name), layer(dep)
        if mine not in (None, "?") and theirs not in (None, "?") and RANK[theirs] > RANK[mine]:
            out.add(f"upward: {m.name} ({mine}) imports {dep} ({theirs})")
    return out


def private(root: Path) -> set[str]:
    return {f"private: {m.name} imports {dep}.{n}" for m, dep, names in _deps(root)
            for n in names if n.startswith("_") and not n.startswith("__")}


def ui(root: Path) -> set[str]:
    return {f"ui: {m.name} imports {dep.split('.')[0]}" for m in scan(root).values()
            for dep, _ in m.imports if dep.split(".")[0] in UI and layer(m.name) not in (None, "cli")}


def oversize(root: Path) -> set[str]:
    return {f"size: {m.name} has {m.lines} lines" for m in scan(root).values() if m.lines > MAX_LINES}


def cycles(root: Path) -> set[str]:
    """One line per strongly connected component of the import graph (Tarjan)."""
    graph: dict[str, set[str]] = {mod: set() for mod in scan(root)}
    for m, dep, _ in _deps(root):
        graph[m.name].add(dep)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: set[str] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.add("cycle: " + ", ".join(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


RULES: tuple[Callable[[Path], set[str]], ...] = (homeless, upward, private, ui, cycles, oversize)


def violations(root: Path) -> set[str]:
    return set().union(*(rule(root) for rule in RULES))


# --- the real package --------------------------------------------------------------------


def test_the_package_keeps_its_architecture() -> None:
    found = violations(SRC)
    new, fixed = sorted(found - ALLOWED), sorted(ALLOWED - found)
    assert not new, "architecture violations:\n" + "\n".join(new)
    assert not fixed, "allowed violations that are gone (remove them from ALLOWED):\n" + "\n".join(fixed)


def test_the_scanner_sees_the_real_dynamic_imports() -> None:
    """The lazy imports the package really makes are edges: the facade's name -> module
    dict, the CLI's plugin list, the probe discovery f-string. (If this broke, the rules would
    silently stop seeing them.)"""
    imports = {m.name: {dep for dep, _ in m.imports} for m in scan(SRC).values()}
    assert "batchlab.runs.store" in imports["batchlab"]
    assert "batchlab.cli.experiment" in imports["batchlab.cli.root"]
    assert "batchlab.probes.geometry" in imports["batchlab.probes"]
    assert "batchlab.experiments.sharpness" in imports["batchlab.experiments"]
    assert _lazy_attributes(ast.parse((SRC / "__init__.py").read_text()), set(scan(SRC)))["Store"] \
        == "batchlab.runs.store"


# --- every rule fails on a planted case --------------------------------------------------


def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package `batchlab` in tmp_path with these files (paths relative to it); every
    folder gets an empty `__init__.py` unless one is given."""
    root = tmp_path / "batchlab"
    for rel, code in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
        for folder in path.relative_to(root).parents:
            init = root / folder / "__init__.py"
            if not init.exists():
                init.write_text("")
    return root


LOOP = {"engine/loop.py": "def train_one() -> None: ...\n"}
LAZY = "import importlib\n\n\ndef load(name):\n    return importlib.import_module({})\n"
FACADE_INIT = ("import importlib\n_PUBLIC = {'train_one': 'batchlab.engine.loop'}\n\n\n"
               "def __getattr__(name):\n    return getattr(importlib.import_module(_PUBLIC[name]), name)\n")
CASES: list[tuple[Callable[[Path], set[str]], dict[str, str], set[str]]] = [
    (homeless, {"helpers.py": "x = 1\n"}, {"layer: batchlab.helpers is in no layer"}),
    *[(upward, {**LOOP, "__init__.py": FACADE_INIT, "data/x.py": code},
       {"upward: batchlab.data.x (data) imports batchlab.engine.loop (engine)"})
      for code in [
          "from batchlab.engine.loop import train_one\n",
          "import batchlab.engine.loop\n",
          "from ..engine import loop\n",
          "def f():\n    from batchlab.engine import loop\n",
          LAZY.format("'batchlab.engine.loop'"),
          "m = __import__('batchlab.engine.loop')\n",
          # a module list, as the CLI registers its plugins
          "import importlib\nfor mod in ('batchlab.data.y', 'batchlab.engine.loop'):\n"
          "    importlib.import_module(mod)\n",
          # a name the package facade loads lazily from a module above
    "from batchlab import train_one\n",
    # a name -> module dict, as the package facade loads its public names
          "import importlib\n_LAZY = {'train': 'batchlab.engine.loop'}\n\n\n"
          "def __getattr__(name):\n    return getattr(importlib.import_module(_LAZY[name]), name)\n",
      ]],
    # an f-string over a literal registry names exactly the registered modules
    (upward, {"runs/a.py": "", "runs/b.py": "",
              "data/x.py": "REGISTRY = {'a': 'a'}\n" + LAZY.format("f'batchlab.runs.{REGISTRY[name]}'")},
     {"upward: batchlab.data.x (data) imports batchlab.runs.a (runs)"}),
    (upward, {"runs/a.py": "", "data/x.py": LAZY.format("f'batchlab.runs.{name}'")},
     {"upward: batchlab.data.x (data) imports batchlab.runs (runs)",
      "upward: batchlab.data.x (data) imports batchlab.runs.a (runs)"}),
    (private, {"engine/fused.py": "def _helper(): ...\n",
               "engine/x.py": "from batchlab.engine.fused import _helper\n"},
     {"private: batchlab.engine.x imports batchlab.engine.fused._helper"}),
    (ui, {"runs/x.py": "import rich.console\n"}, {"ui: batchlab.runs.x imports rich"}),
    (ui, {"engine/x.py": "from typer import Typer\n"}, {"ui: batchlab.engine.x imports typer"}),
    # the nn/optim <-> nn/layerwise shape: one side static, the other by string at call time
    (cycles, {"nn/x.py": "from batchlab.nn import y\n", "nn/y.py": LAZY.format("'batchlab.nn.x'")},
     {"cycle: batchlab.nn.x, batchlab.nn.y"}),
    # plugin discovery: the package imports its modules by f-string, they import the package
    (cycles, {"probes/__init__.py": LAZY.format("f'batchlab.probes.{name}'") + "class Probe: ...\n",
              "probes/p.py": "from batchlab.probes import Probe\n"},
     {"cycle: batchlab.probes, batchlab.probes.p"}),
    (cycles, {"nn/a.py": "from . import b\n", "nn/b.py": "import batchlab.nn.c\n",
              "nn/c.py": "from batchlab.nn.a import f\n", "nn/d.py": "from batchlab.nn import a\n"},
     {"cycle: batchlab.nn.a, batchlab.nn.b, batchlab.nn.c"}),
    (oversize, {"runs/x.py": "x = 1\n" * (MAX_LINES + 1)}, {f"size: batchlab.runs.x has {MAX_LINES + 1} lines"}),
]


@pytest.mark.parametrize(("rule", "files", "expected"), CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_planted_violation(tmp_path: Path, rule: Callable[[Path], set[str]], files: dict[str, str],
                           expected: set[str]) -> None:
    """The checker reports exactly the planted violation, under its own rule and no other."""
    root = plant(tmp_path, files)
    assert rule(root) == expected
    assert violations(root) == expected


def test_every_rule_has_a_planted_case() -> None:
    assert {c[0] for c in CASES} == set(RULES)


def test_a_clean_package_has_no_violations(tmp_path: Path) -> None:
    """Nothing is reported that is not a violation: downward and same-layer imports of every
    kind, a dunder import, a module of exactly the size limit, a string that names an upper
    module without importing it, the facade and the CLI importing anything."""
    root = plant(tmp_path, {
        **LOOP,
        "__init__.py": "import importlib\n_LAZY = {'x': 'batchlab.cli.app'}\n"
                       "getattr(importlib.import_module(_LAZY['x']), 'x')\n",
        "__main__.py": "from batchlab.cli.app import main\n",
        "errors.py": "class ConfigError(Exception): ...\n",
        "data/a.py": "from batchlab.errors import ConfigError\nfrom . import b\n",
        "data/b.py": "HELP = 'see batchlab.engine.loop'\nNAMES = {'loop': 'batchlab.engine.loop'}\n",
        "engine/x.py": "from batchlab.engine.loop import __doc__\n" + LAZY.format("'batchlab.data.a'"),
        "engine/y.py": "import importlib\nfor m in ('batchlab.engine.x', 'batchlab.data.b'):\n"
                       "    importlib.import_module(m)\n" + "x = 1\n" * (MAX_LINES - 3),
        "cli/app.py": "import typer\nfrom rich.console import Console\nimport batchlab.engine.y\n"
                      "import batchlab\n\n\ndef main(): ...\n",
    })
    assert len((root / "engine/y.py").read_text().splitlines()) == MAX_LINES
    assert violations(root) == set()
