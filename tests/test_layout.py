"""The layers hold: the tools (convert, train, eval) import only the base, never each other or an app; the base
imports no tool and no app. Imports inside functions count too: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder of the repository -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {"base": "gqa_uptrain", "convert": "gqa_uptrain.convert", "train": "gqa_uptrain.train",
            "eval": "gqa_uptrain.eval", "apps": "gqa_uptrain.apps"}
TOOLS = {"convert", "train", "eval"}
# What each layer may import from the project, besides itself.
ALLOWED = {"base": {"base"}, "convert": {"base"}, "train": {"base"}, "eval": {"base"},
           "apps": {"base", *TOOLS, "apps"}}


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to; None outside the project."""
    parts = module.split(".")
    if parts[0] != "gqa_uptrain":
        return None
    if len(parts) > 1 and parts[1] in TOOLS | {"apps"}:
        return parts[1]
    return "base"


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, module) for every import anywhere in the file; `from x import y` counts as x.y (y may be a module)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.split(".")
                base = ".".join(parent[: len(parent) - node.level + 1]) if node.level <= len(parent) else "<outside>"
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    """Every import under `root` that crosses a layer the wrong way, as 'file:line: layer imports module'."""
    found = []
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root / folder)
            file_package = ".".join([package, *relative.parent.parts]) if relative.parent.parts else package
            tree = ast.parse(path.read_text(), filename=str(path))
            for line, module in imported_modules(tree, file_package):
                layer = layer_of(module)
                if module.startswith("<outside>") or (layer is not None and layer != folder
                                                      and layer not in ALLOWED[folder]):
                    found.append(f"{path.relative_to(root)}:{line}: {folder} imports {module}")
    return found


def test_package_map_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert package_dir == {package: folder for folder, package in PACKAGES.items()}


def test_no_tool_imports_another_tool_or_an_app_and_the_base_imports_neither():
    assert violations(REPO) == []


def test_the_check_catches_lazy_and_relative_imports(tmp_path):
    for folder in PACKAGES:
        (tmp_path / folder).mkdir()
    (tmp_path / "base" / "helpers.py").write_text("def f():\n    from gqa_uptrain.eval import report\n")
    (tmp_path / "convert" / "plan.py").write_text("from gqa_uptrain import train\nfrom gqa_uptrain.errors import X\n")
    (tmp_path / "train" / "loop.py").write_text("from .. import apps\nfrom . import data\n")
    (tmp_path / "eval" / "runner.py").write_text("import gqa_uptrain.apps.demo\n")
    (tmp_path / "apps" / "demo.py").write_text("from gqa_uptrain.convert import convert_checkpoint\n")
    assert violations(tmp_path) == [
        "base/helpers.py:2: base imports gqa_uptrain.eval.report",
        "convert/plan.py:1: convert imports gqa_uptrain.train",
        "train/loop.py:1: train imports gqa_uptrain.apps",
        "eval/runner.py:1: eval imports gqa_uptrain.apps.demo",
    ]
