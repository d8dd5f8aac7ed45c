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
