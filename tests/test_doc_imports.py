"""Every `from batchlab... import ...` a user may copy from a docstring or the README names
something that exists: modules move (`batchlab.curvature` became `batchlab.measure.curvature`)
and an example that no longer imports is the first thing a user meets."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT = re.compile(r"from (batchlab[\w.]*) import (\w+(?:, *\w+)*)")  # anywhere in a line


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = [n for n in ast.walk(tree)
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def _examples() -> list[tuple[str, str, str]]:
    """(where, module, name) for every import line in the package's docstrings and README."""
    texts = [(str(p.relative_to(ROOT)), d) for p in sorted((ROOT / "src" / "batchlab").rglob("*.py"))
             for d in _docstrings(p)]
    texts.append(("README.md", (ROOT / "README.md").read_text()))
    out = []
    for where, text in texts:
        for m in IMPORT.finditer(text):
            out += [(where, m.group(1), n.strip()) for n in m.group(2).split(",") if n.strip()]
    return out


def test_the_scan_finds_the_examples() -> None:
    found = {(w, m) for w, m, _ in _examples()}
    assert ("src/batchlab/measure/curvature/compat.py", "batchlab.measure.curvature") in found
    assert any(w == "README.md" for w, _ in found)


def _defines(module: str, name: str) -> bool:
    """Whether the module's source defines `name` at top level (for modules of an optional
    extra that is not installed: they refuse to import, by design, with a pip hint)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module}"
    tree = ast.parse(Path(spec.origin).read_text())
    for n in tree.body:
        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name:
            return True
        if isinstance(n, (ast.Assign, ast.AnnAssign)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
    return False


@pytest.mark.parametrize("where, module, name", _examples())
def test_documented_import_exists(where: str, module: str, name: str) -> None:
    try:
        m = importlib.import_module(module)
    except ImportError as e:  # an optional extra (transformers, mlflow, ...) not installed here
        assert "pip install" in str(e), f"{where}: `import {module}` fails: {e}"
        assert _defines(module, name), f"{where}: `from {module} import {name}` does not import"
        return
    assert hasattr(m, name) or importlib.util.find_spec(f"{module}.{name}") is not None, \
        f"{where}: `from {module} import {name}` does not import"
