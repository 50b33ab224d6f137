"""The layers of ``docs/ARCHITECTURE.md``, enforced: every import of an ``ewc_fast`` module made anywhere in
``ewc_fast/`` or ``kernels/`` (installed as ``ewc_fast.kernels``) goes to the same layer or a layer below.

Imports are read from the source (``ast``), including imports inside functions and
``importlib.import_module("ewc_fast....")`` calls, and relative imports are resolved, so a lazy import
cannot hide a layering violation. There are no exceptions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: layer -> the layers it may import (besides itself). Listed bottom-up; ``ewc_fast`` is the package root
#: (its ``__init__`` re-exports the public API, so importing the root means importing every layer).
ALLOWED = {
    "ewc_fast.kernels": set(),
    "ewc_fast._C": set(),
    "ewc_fast._version": set(),
    "ewc_fast.ops": {"ewc_fast.kernels", "ewc_fast._C"},
    "ewc_fast.importance": {"ewc_fast.ops"},
    "ewc_fast.testing": set(),  # the float64 oracles share no code with what they check
    "ewc_fast.estimation": {"ewc_fast.ops", "ewc_fast.importance"},
    "ewc_fast.consolidation": {"ewc_fast.ops", "ewc_fast.importance"},
    "ewc_fast.optim": {"ewc_fast.ops", "ewc_fast.importance", "ewc_fast.consolidation"},
    "ewc_fast.integrations": {
        "ewc_fast.ops",
        "ewc_fast.importance",
        "ewc_fast.estimation",
        "ewc_fast.consolidation",
        "ewc_fast.optim",
        "ewc_fast._version",
    },
    "ewc_fast.experiments": {
        "ewc_fast",
        "ewc_fast._version",
        "ewc_fast.ops",
        "ewc_fast.importance",
        "ewc_fast.estimation",
        "ewc_fast.consolidation",
        "ewc_fast.optim",
        "ewc_fast.integrations",
    },
    "ewc_fast.cli": {
        "ewc_fast",
        "ewc_fast._version",
        "ewc_fast.ops",
        "ewc_fast.importance",
        "ewc_fast.estimation",
        "ewc_fast.consolidation",
        "ewc_fast.optim",
        "ewc_fast.integrations",
        "ewc_fast.experiments",
    },
    "ewc_fast.__main__": {"ewc_fast.cli"},
    "ewc_fast": {
        "ewc_fast._version",
        "ewc_fast.ops",
        "ewc_fast.importance",
        "ewc_fast.estimation",
        "ewc_fast.consolidation",
        "ewc_fast.optim",
    },
}


def _layer(module: str) -> str:
    """The longest layer name that is ``module`` or a package above it."""
    best = None
    for layer in ALLOWED:
        if module == layer or module.startswith(layer + "."):
            if best is None or len(layer) > len(best):
                best = layer
    assert best is not None, f"module {module} is in no layer of ALLOWED: add it (and to docs/ARCHITECTURE.md)"
    return best


def _module_name(path: Path) -> tuple[str, bool]:
    """(dotted module name, is_package) of a source file."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["ewc_fast", *parts]
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _imports(path: Path, module: str, is_pkg: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path`` that names an ``ewc_fast`` module."""
    package = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import sub`` may import a submodule: count the most specific name
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call):
            found += [
                (node.lineno, arg.value)
                for arg in node.args
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("ewc_fast.")
            ]
    return [(line, m) for line, m in found if m == "ewc_fast" or m.startswith("ewc_fast.")]


def test_every_import_goes_down_the_layers():
    files = sorted(ROOT.glob("ewc_fast/**/*.py")) + sorted(ROOT.glob("kernels/**/*.py"))
    assert len(files) > 20
    bad = []
    for path in files:
        module, is_pkg = _module_name(path)
        src = _layer(module)
        for line, target in _imports(path, module, is_pkg):
            dst = _layer(target)  # ``from ewc_fast import EWC`` imports the package root
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {target} ({dst})")
    assert not bad, "imports that go up or sideways in the layers:\n" + "\n".join(bad)


def test_the_layer_table_matches_the_tree():
    """Every package directory under ewc_fast/ belongs to a layer (a new package must be placed)."""
    for d in sorted(p for p in (ROOT / "ewc_fast").iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        assert _layer(f"ewc_fast.{d.name}") != "ewc_fast", f"ewc_fast/{d.name}/ has no layer in ALLOWED"
