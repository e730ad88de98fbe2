"""README's two commands are the ones CI runs: the demo (from a fresh clone, in a fresh
virtualenv) and the tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_command(marker: str) -> str:
    script = (ROOT / ".ci" / "run").read_text()
    start = script.index("readme_command() {")
    function = script[start : script.index("}\n", start) + 2]
    out = subprocess.run(
        ["bash", "-c", f"{function}\nreadme_command {marker}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_ci_extracts_the_readme_demo_command() -> None:
    command = _readme_command("demo")
    assert command.endswith("pip install -e . && fedtre demo")
    assert "python3 -m venv" in command
    script = (ROOT / ".ci" / "run").read_text()
    assert 'demo_command="$(readme_command demo)"' in script
    assert "git clone --quiet . " in script


def test_ci_runs_the_readme_test_command() -> None:
    command = _readme_command("tests")
    assert command.endswith('pip install -e ".[dev]" && python -m pytest')
    script = (ROOT / ".ci" / "run").read_text()
    assert 'python -m pip install --quiet -e ".[dev]"' in script
    assert "\npython -m pytest\n" in script
    assert "python proto/generate.py --check" in script
