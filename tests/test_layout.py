"""The layers hold: the tools (convert, train, eval) import only the base, never each other or an app; the base
imports no tool and no app; apps import a tool only through its door, the names in its `__init__.py`'s `__all__`.
Imports inside functions count too: a lazy import is still a dependency.
"""

import ast
import importlib
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


@pytest.fixture
def repo(tmp_path) -> Path:
    """An empty repository layout: one folder per package, for planting imports the checks must catch."""
    for folder in PACKAGES:
        (tmp_path / folder).mkdir()
    return tmp_path


def test_the_check_catches_lazy_and_relative_imports(repo):
    (repo / "base" / "helpers.py").write_text("def f():\n    from gqa_uptrain.eval import report\n")
    (repo / "convert" / "plan.py").write_text("from gqa_uptrain import train\nfrom gqa_uptrain.errors import X\n")
    (repo / "train" / "loop.py").write_text("from .. import apps\nfrom . import data\n")
    (repo / "eval" / "runner.py").write_text("import gqa_uptrain.apps.demo\n")
    (repo / "apps" / "demo.py").write_text("from gqa_uptrain.convert import convert_checkpoint\n")
    assert violations(repo) == [
        "base/helpers.py:2: base imports gqa_uptrain.eval.report",
        "convert/plan.py:1: convert imports gqa_uptrain.train",
        "train/loop.py:1: train imports gqa_uptrain.apps",
        "eval/runner.py:1: eval imports gqa_uptrain.apps.demo",
    ]


def door(root: Path, tool: str) -> set[str]:
    """The names a tool's `__init__.py` lists in `__all__`: what apps may import from it."""
    tree = ast.parse((root / tool / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def around_the_doors(root: Path) -> list[str]:
    """Every import in apps/ of a tool's module (`gqa_uptrain.eval.report`, relative or not) or of a name its door
    does not list, as 'file:line: apps imports what'."""
    found = []
    for path in sorted((root / "apps").rglob("*.py")):
        relative = path.relative_to(root / "apps")
        package = ".".join([PACKAGES["apps"], *relative.parent.parts])
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                imports = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                parent = package.split(".")
                module = ".".join(filter(None, [".".join(parent[: len(parent) - node.level + 1]) if node.level
                                                else "", node.module or ""]))
                imports = [(module, alias.name) for alias in node.names]
            else:
                continue
            for module, name in imports:
                parts = module.split(".")
                if parts[0] != "gqa_uptrain" or len(parts) < 2 or parts[1] not in TOOLS:
                    continue
                tool = parts[1]
                if len(parts) > 2:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: apps imports {module} (a module of {tool})")
                elif name is not None and name not in door(root, tool):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: apps imports {name} from {tool}, which "
                                 "its door (__all__) does not list")
    return found


def test_apps_use_only_the_doors_of_the_tools():
    assert around_the_doors(REPO) == []


def test_every_name_of_a_door_opens():
    """Each `__all__` name resolves, the lazy ones too (a name whose module moved would fail only when an app used
    it), and no door name is one of the tool's modules."""
    for tool in sorted(TOOLS):
        package = importlib.import_module(PACKAGES[tool])
        for name in sorted(door(REPO, tool)):
            assert not (REPO / tool / f"{name}.py").exists() and not (REPO / tool / name).is_dir(), (tool, name)
            assert getattr(package, name) is not None, (tool, name)


def test_the_door_check_catches_modules_and_unlisted_names(repo):
    (repo / "eval" / "__init__.py").write_text('__all__ = ["evaluate", "compare"]\n')
    (repo / "convert" / "__init__.py").write_text('__all__ = ["convert_checkpoint"]\n')
    (repo / "train" / "__init__.py").write_text("")
    (repo / "apps" / "demo.py").write_text(
        "from gqa_uptrain.eval import evaluate, compare\n"
        "from gqa_uptrain.convert import convert_checkpoint\n"
        "import gqa_uptrain.eval\n"
        "def f():\n"
        "    from gqa_uptrain.eval.report import compare\n"
        "    from gqa_uptrain.eval import report\n"
        "    import gqa_uptrain.train.loop\n"
        "    from ..convert import card\n"
        "    from ..train.recipe import Recipe\n")
    assert around_the_doors(repo) == [
        "apps/demo.py:5: apps imports gqa_uptrain.eval.report (a module of eval)",
        "apps/demo.py:6: apps imports report from eval, which its door (__all__) does not list",
        "apps/demo.py:7: apps imports gqa_uptrain.train.loop (a module of train)",
        "apps/demo.py:8: apps imports card from convert, which its door (__all__) does not list",
        "apps/demo.py:9: apps imports gqa_uptrain.train.recipe (a module of train)",
    ]
