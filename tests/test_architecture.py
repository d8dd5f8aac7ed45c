"""The shape of the code base, read from every module's syntax tree (imports inside functions included):

- the layers: the library (models, datasets, utils) never imports the application (engine); utils builds on
  nothing of ours;
- no import cycle among our modules, and no module reaching for another module's private (``_name``) parts
  (tests may: they test internals on purpose);
- every entry point (a script or ``python -m`` module with a ``__main__`` block) runs inside
  ``user_errors_as_one_line()``, so a user mistake prints one line;
- one owner per file format: ``torch.load`` is called in one place (``utils.checkpoint.load_file``, which checks
  the zip checksums first), and ``models/`` maps tensors without writing any file;
- no function longer than 80 lines anywhere in the tree, and pyflakes reports nothing;
- bench/ is a package run as ``python -m bench.<name>`` from the root: no module there edits ``sys.path``.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("models", "datasets", "utils")
APPLICATION = "engine"
PACKAGES = LIBRARY + (APPLICATION, "bench", "tests")
HANDLER = "user_errors_as_one_line"
MAX_FUNCTION_LINES = 80


def our_files() -> list[Path]:
    """Every Python file of the repository: the packages and the top-level scripts."""
    files = sorted(ROOT.glob("*.py"))
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def module_index() -> dict[str, Path]:
    return {module_name(p): p for p in our_files()}


@lru_cache(maxsize=None)
def syntax_tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


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


def imported_names(path: Path) -> dict[str, tuple[str, str | None]]:
    """Local name -> (our module, attribute or None for the module itself), for every import of our code."""
    index, found = module_index(), {}
    for node in ast.walk(syntax_tree(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in index:
                    found[alias.asname or alias.name] = (alias.name, None)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in index:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found[alias.asname or alias.name] = ((submodule, None) if submodule in index
                                                     else (node.module, alias.name))
    return found


def import_graph() -> dict[str, set[str]]:
    """Our module -> the modules of ours it imports (a package's own __init__ is not counted as a dependency)."""
    graph = {}
    for name, path in module_index().items():
        graph[name] = {target for target, _ in imported_names(path).values() if target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first == last), or [] when there is none."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def private_uses(path: Path) -> list[str]:
    """``from ours import _name`` and ``ours_module._name`` in ``path``, as 'line: module._name'."""
    names = imported_names(path)
    found = []
    for node in ast.walk(syntax_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in module_index():
            found += [f"{node.lineno}: {node.module}.{a.name}" for a in node.names if is_private(a.name)]
        elif (isinstance(node, ast.Attribute) and is_private(node.attr) and isinstance(node.value, ast.Name)
              and names.get(node.value.id, ("", ""))[1] is None):
            found.append(f"{node.lineno}: {names[node.value.id][0]}.{node.attr}")
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# ------------------------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_never_imports_the_application(package):
    offenders = [str(p.relative_to(ROOT)) for p in modules_of(package) if APPLICATION in imported_packages(p)]
    assert modules_of(package) and not offenders


def test_utils_is_the_bottom_layer():
    # utils holds config, checkpoint files, metrics, distributed helpers: it builds on nothing of ours.
    offenders = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & {"models", "datasets", APPLICATION})
                 for p in modules_of("utils")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_models_and_datasets_share_a_floor_without_importing_each_other():
    offenders = {str(p.relative_to(ROOT)) for package, other in (("models", "datasets"), ("datasets", "models"))
                 for p in modules_of(package) if other in imported_packages(p)}
    assert offenders == set()


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from engine.training import train\n    import engine.cli\n")
    assert imported_packages(module) == {"engine"}


# ------------------------------------------------------------------------------------ cycles, privates
def test_no_import_cycle_among_our_modules():
    assert find_cycle(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_module_uses_another_modules_private_names():
    offenders = {str(p.relative_to(ROOT)): private_uses(p) for p in our_files()
                 if "tests" not in p.relative_to(ROOT).parts}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_private_check_sees_both_spellings(tmp_path, monkeypatch):
    module = tmp_path / "m.py"
    module.write_text("from utils.errors import _hidden\nimport utils.checkpoint as ck\nck._file_mode()\n"
                      "ck.__name__\n")
    assert private_uses(module) == ["1: utils.errors._hidden", "3: utils.checkpoint._file_mode"]


# ----------------------------------------------------------------------------------------- file formats
THE_LOADER = "utils/checkpoint.py"
WRITERS = {"save", "atomic_save", "atomic_write", "save_file", "save_pretrained", "write_text", "write_bytes",
           "savez", "savez_compressed", "dump"}


def calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(syntax_tree(path)) if isinstance(n, ast.Call)]


def call_name(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def torch_loads(path: Path) -> list[int]:
    """Lines calling ``torch.load`` (any spelling ending in ``.load`` on a name bound to torch)."""
    return [n.lineno for n in calls(path) if isinstance(n.func, ast.Attribute) and n.func.attr == "load"
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"]


def file_writes(path: Path) -> list[str]:
    """Calls that write a file: a known writer (torch.save, atomic_save, safetensors' save_file, Path.write_text,
    json.dump, ...) or ``open``/``Path.open`` with a mode that writes, as 'line: name'."""
    found = []
    for node in calls(path):
        name = call_name(node)
        positional = node.args[1:2] if isinstance(node.func, ast.Name) else node.args[:1]  # open(f, mode), p.open(mode)
        modes = [a.value for a in positional + [k.value for k in node.keywords if k.arg == "mode"]
                 if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if name in WRITERS or (name == "open" and any(set(m) & set("wax+") for m in modes)):
            found.append(f"{node.lineno}: {name}")
    return found


def test_torch_load_is_called_only_by_the_one_loader():
    offenders = {str(p.relative_to(ROOT)): torch_loads(p) for p in our_files()
                 if str(p.relative_to(ROOT)) != THE_LOADER}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(torch_loads(ROOT / THE_LOADER)) == 1


CHECKPOINT_OWNER = "engine/checkpoints.py"


def checkpoint_literals(path: Path) -> list[int]:
    """Lines of dict literals tagged as our checkpoint (``"format": FORMAT_NAME`` or its value spelt out)."""
    found = []
    for node in ast.walk(syntax_tree(path)):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if (isinstance(key, ast.Constant) and key.value == "format"
                        and ((isinstance(value, ast.Name) and value.id == "FORMAT_NAME")
                             or (isinstance(value, ast.Constant) and value.value == "ivt-retrieval-checkpoint"))):
                    found.append(node.lineno)
    return found


def test_only_the_checkpoint_module_builds_our_checkpoint_dict():
    offenders = {str(p.relative_to(ROOT)): checkpoint_literals(p) for p in our_files()
                 if str(p.relative_to(ROOT)) != CHECKPOINT_OWNER}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(checkpoint_literals(ROOT / CHECKPOINT_OWNER)) == 1  # checkpoint_dict


def test_models_write_no_file():
    offenders = {str(p.relative_to(ROOT)): file_writes(p) for p in modules_of("models")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_format_checks_see_every_spelling(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import torch, json\nfrom pathlib import Path\ntorch.load('a')\nopen('a', 'wb')\n"
                      "open('a')\nPath('a').open(mode='a')\ntorch.save({}, 'a')\njson.dump({}, f)\n"
                      "Path('a').write_text('x')\nopen('a', 'rb')\n")
    assert torch_loads(module) == [3]
    literals = tmp_path / "d.py"  # another file: syntax trees are cached by path
    literals.write_text("x = {'format': FORMAT_NAME}\ny = {\"format\": 'ivt-retrieval-checkpoint'}\n"
                        "z = {'format': 'pt'}\n")
    assert checkpoint_literals(literals) == [1, 2]
    assert file_writes(module) == ["4: open", "6: open", "7: save", "8: dump", "9: write_text"]


# ------------------------------------------------------------------------------------------ entry points
def entry_points() -> list[Path]:
    """Scripts and ``python -m`` modules with a ``__main__`` block (the tests' own helpers aside)."""
    return [p for p in our_files() if "tests" not in p.relative_to(ROOT).parts and main_block(p) is not None]


def main_block(path: Path) -> ast.If | None:
    for node in syntax_tree(path).body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
            return node
    return None


def is_handler(node: ast.expr) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return (isinstance(func, ast.Name) and func.id == HANDLER) or (isinstance(func, ast.Attribute)
                                                                   and func.attr == HANDLER)


def handled(path: Path, name: str, seen: frozenset = frozenset()) -> bool:
    """Whether calling ``name`` of module ``path`` runs inside the handler: decorated with it, holding a ``with``
    block of it, or returning the call of a function of ours that is handled."""
    if (path, name) in seen:
        return False
    function = next((n for n in syntax_tree(path).body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if function is None:
        target = imported_names(path).get(name)
        return bool(target and target[1]) and handled(module_index()[target[0]], target[1], seen | {(path, name)})
    if any(is_handler(d) for d in function.decorator_list):
        return True
    if any(isinstance(n, ast.With) and any(is_handler(i.context_expr) for i in n.items)
           for n in ast.walk(function)):
        return True
    returns = [n.value for n in ast.walk(function) if isinstance(n, ast.Return)]
    return bool(returns) and all(
        isinstance(r, ast.Call) and isinstance(r.func, ast.Name) and handled(path, r.func.id, seen | {(path, name)})
        for r in returns)


def entry_handled(path: Path) -> bool:
    if not imported_names(path):
        return True  # imports none of our code, so no UserError can reach it
    called = {n.func.id for n in ast.walk(main_block(path)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return any(handled(path, name) for name in called)


def test_every_entry_point_runs_inside_the_user_error_handler():
    entries = entry_points()
    names = {str(p.relative_to(ROOT)) for p in entries}
    assert {"train_cuhkpedes.py", "evaluate.py", "retrieve.py", "serve.py", "engine/export.py", "datasets/check.py",
            "engine/convert_official.py", "bench/train_step.py", "bench/train_epoch.py",
            "bench/train_memory.py"} <= names
    assert sorted(str(p.relative_to(ROOT)) for p in entries if not entry_handled(p)) == []


def test_the_entry_check_follows_delegation_and_sees_a_bare_main(tmp_path, monkeypatch):
    (tmp_path / "thin.py").write_text("from engine.cli import train_main\n\ndef main(argv=None):\n"
                                      "    return train_main(argv, 'doc', 'configs/x.yaml')\n\n"
                                      "if __name__ == '__main__':\n    main()\n")
    (tmp_path / "bare.py").write_text("from utils.config import load_config\n\ndef main(argv=None):\n"
                                      "    return load_config(argv[0])\n\nif __name__ == '__main__':\n    main()\n")
    assert entry_handled(tmp_path / "thin.py") and not entry_handled(tmp_path / "bare.py")


# ----------------------------------------------------------------------------------------------- size, lint
def long_functions(path: Path) -> list[str]:
    return [f"{n.name} ({n.end_lineno - n.lineno + 1} lines, line {n.lineno})" for n in ast.walk(syntax_tree(path))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_is_longer_than_80_lines():
    offenders = {str(p.relative_to(ROOT)): long_functions(p) for p in our_files()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_pyflakes_reports_nothing():
    pytest.importorskip("pyflakes", reason="pyflakes is not installed (pip install -r requirements-test.txt)")
    result = subprocess.run([sys.executable, "-m", "pyflakes", *[str(p) for p in our_files()]], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.stdout + result.stderr == ""


def test_the_architecture_map_names_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for package in LIBRARY + (APPLICATION, "bench"):
        for path in modules_of(package):
            inner = path.relative_to(ROOT / package).parts
            named = f"{inner[0]}/" if len(inner) > 1 else path.name  # a subpackage is named as a folder
            if path.name != "__init__.py" and f"`{named}" not in doc:
                missing.append(str(path.relative_to(ROOT)))
    assert missing == []


# ------------------------------------------------------------------------------------------------- bench
def sys_path_edits(path: Path) -> list[str]:
    """Lines of ``path`` that change ``sys.path`` (a call of one of its methods, or an assignment to it)."""
    def is_sys_path(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")

    found = []
    for node in ast.walk(syntax_tree(path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            found.append(f"{node.lineno}: sys.path.{node.func.attr}")
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [f"{node.lineno}: sys.path =" for t in targets
                      if is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value))]
    return sorted(found, key=lambda line: int(line.split(":")[0]))


def test_bench_runs_as_a_package_without_sys_path_edits():
    assert (ROOT / "bench" / "__init__.py").is_file()
    offenders = {str(p.relative_to(ROOT)): sys_path_edits(p) for p in modules_of("bench")}
    assert {k: v for k, v in offenders.items() if v} == {}
    late_imports = [str(p.relative_to(ROOT)) for p in modules_of("bench") if "noqa: E402" in p.read_text()]
    assert late_imports == []


def test_the_sys_path_check_sees_every_spelling(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import sys\nsys.path.insert(0, '.')\nsys.path.append('x')\nsys.path = []\n"
                      "sys.path[:0] = ['y']\nsys.path += ['z']\nprint(sys.path)\n")
    assert sys_path_edits(module) == ["2: sys.path.insert", "3: sys.path.append", "4: sys.path =", "5: sys.path =",
                                      "6: sys.path ="]
