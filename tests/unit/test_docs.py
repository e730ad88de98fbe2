"""docs/THREATS.md names the tests that check each threat: every one it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_every_test_named_in_the_threat_map_exists() -> None:
    text = (ROOT / "docs" / "THREATS.md").read_text(encoding="utf-8")
    missing = []
    for row in text.splitlines():
        current = None
        for ref in re.findall(r"`([^`]*)`", row):
            file, _, name = ref.partition("::")
            if file.endswith(".py"):
                current = ROOT / file if (ROOT / file).is_file() else ROOT / "tests" / file
                if not current.is_file():
                    missing.append(file)
                    continue
            if name and current is not None:
                test = name.split("[")[0]
                if not re.search(rf"^def {re.escape(test)}\(", current.read_text(), re.M):
                    missing.append(f"{current.relative_to(ROOT)}::{test}")
    assert not missing, missing
