"""The import rule, read from the source: which package may import which, and no one imports underscore names.

The layers, bottom to top: `carbot` (the base: settings, SQL, keys, photos, logging,
metrics, health), then `model`, then `worker` and `training`, then `bots`, with the
command line (`carbot/cli/`) and the measurement tools (`bench/`) on top. Every
import statement counts, also one inside a function: a lazy import is still a
dependency a reader has to know about.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("carbot", "model", "worker", "training", "bots", "bench")
# What each layer may import of the project, besides itself.
ALLOWED = {
    "carbot": set(),
    "model": {"carbot"},
    "worker": {"carbot", "model"},
    "training": {"carbot", "model"},
    "bots": {"carbot", "model", "worker"},
    "carbot.cli": {"carbot", "model", "worker", "training", "bots"},
    "bench": {"carbot", "model", "worker", "training", "bots"},
}


def _layer(module: str) -> str:
    return "carbot.cli" if module == "carbot.cli" or module.startswith("carbot.cli.") else module.split(".")[0]


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(root: Path) -> list[Path]:
    return sorted(p for package in PACKAGES for p in (root / package).rglob("*.py") if "migrations" not in p.parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def _violations(root: Path = ROOT) -> tuple[list[str], list[str]]:
    layering, private = [], []
    for path in _sources(root):
        module = _module_name(path, root)
        layer, package = _layer(module), module.split(".")[0]
        for line, target, names in _imports(path):
            where = f"{path.relative_to(root)}:{line}: {target}"
            top = target.split(".")[0]
            if top not in PACKAGES or _layer(target) == layer or top == package == layer:
                pass
            elif top not in ALLOWED[layer]:
                layering.append(where)
            # An underscore module of another package, or an underscore name of any module.
            private_parts = [part for part in target.split(".")[1:] if part.startswith("_")]
            if top in PACKAGES and private_parts and top != package:
                private.append(where)
            private.extend(f"{where} import {name}" for name in names if name.startswith("_") and top in PACKAGES)
    return layering, private


def test_the_base_layer_and_every_package_import_only_downward():
    layering, _ = _violations()
    assert layering == [], "imports against the layers:\n" + "\n".join(layering)


def test_no_module_imports_another_modules_underscore_names():
    _, private = _violations()
    assert private == [], "underscore names imported from elsewhere:\n" + "\n".join(private)


@pytest.mark.parametrize(
    ("source", "layering", "private"),
    [
        # the base layer reaching up, at the top and lazily inside a function
        ("from worker import ClassifyClient\n", ["carbot/planted.py:1: worker"], []),
        ("def f():\n    from bots import Conversation\n", ["carbot/planted.py:2: bots"], []),
        # another package's underscore module, and an underscore name of the module's own package
        ("from model._preprocess import load_image\n", ["carbot/planted.py:1: model._preprocess"],
         ["carbot/planted.py:1: model._preprocess"]),
        ("from carbot import _metrics\n", [], ["carbot/planted.py:1: carbot import _metrics"]),
    ],
)  # fmt: skip
def test_the_rule_catches_what_it_forbids(tmp_path, source, layering, private):
    """The checker itself: a base-layer module with forbidden imports, in a tree of its own, is reported."""
    (tmp_path / "carbot").mkdir()
    (tmp_path / "carbot" / "planted.py").write_text(source)
    assert _violations(tmp_path) == (layering, private)
