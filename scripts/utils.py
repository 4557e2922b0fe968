"""The one shared module of the toolkit's scripts: ``from utils import load_config, evaluate, ...``.

It re-exports the public names of the ``recsft`` package -- every name a ``scripts/recsft/<module>.py`` defines at
its top level without a leading underscore -- and nothing else. A name is looked up in a table built from the
modules' source and imported on first use, so a script that only parses its flags starts without importing
torch, and ``--help`` or a bad flag answers at once. Each name is defined in exactly one module (the pipeline
stages are listed in ``recsft/__init__.py``); a test keeps it so.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent / "recsft"
_NOT_EXPORTED = {"logger"}  # each module's own logging.getLogger(__name__)


def _public_names(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in names if not n.startswith("_") and n not in _NOT_EXPORTED]


def _index() -> dict[str, str]:
    """``{public name: recsft module}``; a name defined in two modules is an error (it would be ambiguous)."""
    where: dict[str, str] = {}
    for path in sorted(_PACKAGE.glob("*.py")):
        if path.stem == "__init__":
            continue
        for name in _public_names(path):
            if where.setdefault(name, path.stem) != path.stem:
                raise ImportError(f"recsft.{where[name]} and recsft.{path.stem} both define {name!r}; rename one")
    return where


_WHERE = _index()
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'utils' has no attribute {name!r} (not a public name of the recsft package)")
    # looked up on every import, not cached here: what a script gets is what the module holds now
    return getattr(importlib.import_module(f"recsft.{module}"), name)


def __dir__() -> list[str]:
    return __all__
