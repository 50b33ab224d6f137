"""Layering of the kernel layer: ``kernels/`` (installed as ``ewc_fast.kernels``) imports nothing from
``ewc_fast``, so the Triton kernels stay usable and testable on their own and the op layer is the only
place that knows about backends. Checked by scanning the import statements of every ``kernels/*.py``."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path`` (relative imports as '.'-prefixed names), plus every
    call taking a string constant that names an ``ewc_fast`` module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.Call):  # importlib.import_module("ewc_fast...") and the like
            found += [
                (node.lineno, arg.value)
                for arg in node.args
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("ewc_fast")
            ]
    return found


def test_kernels_import_nothing_from_ewc_fast():
    files = sorted(KERNELS.glob("*.py"))
    assert files, f"no kernel modules under {KERNELS}"
    offending = []
    for path in files:
        for line, module in _imported_modules(path):
            top = module.split(".")[0]
            # "ewc_fast" itself, or a relative import reaching above the kernels package
            if top == "ewc_fast" or module.startswith(".."):
                offending.append(f"{path.name}:{line}: {module}")
    assert not offending, "kernels/ must not import from ewc_fast:\n" + "\n".join(offending)
