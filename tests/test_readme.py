"""The README against what CI runs and what the repository holds."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _ci_commands() -> list[str]:
    text = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"# >>> readme-commands\n(.*?)# <<< readme-commands", text, re.S)
    assert block, ".ci/run has no readme-commands block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_quick_start_commands_verbatim():
    commands = _ci_commands()
    assert len(commands) == 2
    assert commands == _quick_start_commands()
    # in the virtualenv .ci/run makes, the commands' pip and python are that environment's
    assert "python3 -m venv" in (ROOT / ".ci" / "run").read_text()


def test_the_default_run_is_the_fast_tests_and_ci_runs_the_slow_ones_in_their_own_step():
    import configparser

    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    assert '-m "not slow"' in ini["pytest"]["addopts"]
    text = (ROOT / ".ci" / "run").read_text()
    after_readme = text.split("# <<< readme-commands", 1)[1]
    slow_steps = [line for line in after_readme.splitlines() if "pytest" in line and "-m slow" in line]
    assert len(slow_steps) == 1 and "--durations=20" in slow_steps[0]


def test_no_absolute_machine_paths_in_committed_files():
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    # written split so that this file does not name them itself
    patterns = [re.compile(p) for p in ("/" + "work/", "/" + "root/", "/" + "tmp/", "/" + "home/")]
    found = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".jpg", ".pth", ".safetensors", ".pt", ".onnx"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{name}: {p.pattern}" for p in patterns if p.search(text)]
    assert not found, found


class _Parsed(Exception):
    """Raised instead of running an entry point once its arguments are parsed."""

    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def _commands(text: str) -> list[list[str]]:
    """Every command of the ```bash blocks of ``text``: continuation lines joined, comments dropped, split at &&."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return [c for c in commands if c]


def _parse_entry(argv: list[str], monkeypatch) -> tuple[str, object]:
    """(what ran, its parsed namespace) for `python X.py ...`, `python -m M ...` or `bash start.sh X N ...`."""
    import argparse
    import runpy
    import sys

    original = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_intermixed_args")}

    def stop(name):
        def parse(self, args=None, namespace=None):
            raise _Parsed(original[name](self, args, namespace))
        return parse

    for name in original:
        monkeypatch.setattr(argparse.ArgumentParser, name, stop(name))
    if argv[0] == "bash":
        assert argv[1] == "start.sh" and (ROOT / argv[2]).is_file() and argv[3].isdigit(), argv
        argv = ["python", argv[2]] + argv[4:]
    assert argv[0] == "python", argv
    module = argv[2] if argv[1] == "-m" else None
    rest = argv[3:] if module else argv[2:]
    monkeypatch.setattr(sys, "argv", [module or argv[1]] + rest)
    monkeypatch.chdir(ROOT)
    try:
        if module:
            monkeypatch.delitem(sys.modules, module, raising=False)  # runpy warns about a module imported before
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        else:
            assert (ROOT / argv[1]).is_file(), argv[1]
            runpy.run_path(str(ROOT / argv[1]), run_name="__main__")
    except _Parsed as parsed:
        return module or argv[1], parsed.namespace
    raise AssertionError(f"{argv}: the entry point never parsed its arguments")


def test_every_command_of_the_readme_and_docs_parses(monkeypatch):
    """Each python/bash command: the script or module exists and accepts the flags; its --config file exists;
    its key=value overrides are keys of configs/base.yaml with values of the right type for that recipe."""
    from utils.config import load_config

    checked = 0
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for argv in _commands(page.read_text()):
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # environment assignments
                argv = argv[1:]
            if argv[:2] == ["pip", "install"]:
                files = [argv[i + 1] for i, word in enumerate(argv) if word == "-r"]
                assert all((ROOT / f).is_file() for f in files), (page.name, argv)
                continue
            if not argv or argv[0] not in ("python", "bash"):
                continue
            if argv[:3] == ["python", "-m", "pytest"]:
                continue
            entry, args = _parse_entry(argv, monkeypatch)
            overrides = [o for o in getattr(args, "overrides", []) or []
                         if not o.split("=", 1)[1].endswith((".json", ".yaml"))]
            config = getattr(args, "config", None)
            if config is not None:
                assert (ROOT / config).is_file(), (page.name, entry, config)
            if overrides or config is not None:
                load_config(str(ROOT / config) if config else None, overrides)
            checked += 1
    assert checked >= 20


def test_readme_stays_short():
    """The README is the front page: what it is, install, quick start, results, links; detail lives in docs/."""
    assert len(README.splitlines()) <= 260


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of ``page``: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_relative_link_of_the_readme_and_docs_resolves():
    """Moving a section between pages must not leave a link to a file or a heading that is gone."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench").rglob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    checked = sum(len(re.findall(r"\]\((?![a-z]+:)", p.read_text())) for p in pages)
    assert checked >= 20 and not broken, broken
