"""The layers of the code base: the library (models, datasets, utils) never imports the application (engine)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("models", "datasets", "utils")
APPLICATION = "engine"


def imported_packages(path: Path) -> set[str]:
    """Top-level package names a module imports anywhere (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def modules_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_never_imports_the_application(package):
    offenders = [str(p.relative_to(ROOT)) for p in modules_of(package) if APPLICATION in imported_packages(p)]
    assert modules_of(package) and not offenders


def test_utils_is_the_bottom_layer():
    # utils holds config, checkpoint files, metrics, distributed helpers: it builds on nothing of ours.
    offenders = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & {"models", "datasets", APPLICATION})
                 for p in modules_of("utils")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from engine.training import train\n    import engine.cli\n")
    assert imported_packages(module) == {"engine"}
