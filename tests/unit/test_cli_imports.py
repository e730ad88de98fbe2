"""The command line loads only what the command in hand needs: every server process and every
CLI call starts through it, and each role's heavy modules cost half a second or more."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedtre.cli import COMMAND_MODULES, ROLE_MODULES, build_parser


def _modules_after_parsing(argv: list[str]) -> set[str]:
    code = (
        "import json, sys\n"
        "from fedtre.cli import build_parser\n"
        f"build_parser({argv!r}).parse_known_args({argv!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out))


@pytest.mark.parametrize(
    ("argv", "absent"),
    [
        (["coordinator", "serve", "--config", "c.toml"], {"node.engine", "duckdb", "pandas"}),
        (["query", "--project", "p", "SELECT 1"], {"node.engine", "coordinator.engine"}),
        (["node", "serve", "--config", "n.toml"], {"coordinator.engine", "fedtre.launcher"}),
        (["node", "optout", "list", "--config", "n.toml"], {"node.engine", "pandas"}),
        (["audit", "verify", "x.sqlite"], {"node.engine", "grpc", "duckdb"}),
    ],
)
def test_a_command_loads_only_its_own_role(argv: list[str], absent: set[str]) -> None:
    loaded = _modules_after_parsing(argv)
    assert COMMAND_MODULES[argv[0]] in loaded
    assert not absent & loaded, f"`fedtre {' '.join(argv)}` loaded {sorted(absent & loaded)}"


def test_help_and_unknown_commands_still_see_every_command() -> None:
    for argv in (None, [], ["--help"], ["no-such-command"]):
        sub = build_parser(argv)._subparsers
        assert sub is not None
        names = set(sub._group_actions[0].choices)  # type: ignore[attr-defined]
        assert set(COMMAND_MODULES) | {"catalog", "synth"} <= names
    assert set(COMMAND_MODULES.values()) == set(ROLE_MODULES)
