"""Coordinator and node server configs: validated at start-up, unknown keys refused."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from coordinator.config import load_coordinator_config
from fedtre.errors import ConfigError
from node.config import load_node_config

GOOD = """\
coordinator_id = "hub"
listen = "127.0.0.1:0"
state_dir = "state"

[tls]
ca = "pki/ca.pem"
cert = "pki/coordinator-hub.pem"
key = "pki/coordinator-hub.key"

[nodes.trust-a]
address = "127.0.0.1:5001"

[nodes.trust-b]
address = "127.0.0.1:5002"

[projects.study]
researchers = ["alice"]
max_epsilon_per_query = 1.0
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_config_and_defaults(tmp_path: Path) -> None:
    config = load_coordinator_config(_write(tmp_path, GOOD))
    project = config.projects["study"]
    assert project.trusts == ("trust-a", "trust-b")
    assert project.allow_partial is False  # default: every trust must answer
    assert (project.rules.suppress_below, project.rules.round_to) == (10, 5)
    assert project.default_units == 100_000
    assert config.deadline_seconds == 30.0
    assert config.ca == (tmp_path / "pki" / "ca.pem").resolve()


def test_the_example_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    config = load_coordinator_config(root / "deploy" / "coordinator.example.toml")
    assert config.governance is not None and not config.projects  # signed registry only
    assert len(config.governance.committee.members) == 3
    node = load_node_config(root / "deploy" / "node.example.toml")
    assert node.server is not None and node.server.coordinator == "hub"
    assert node.governance is not None and node.governance.trust.guardians


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (GOOD + "typo = 1\n", "unknown key"),
        (
            GOOD.replace(
                "max_epsilon_per_query = 1.0", "max_epsilon_per_query = 1.0\nnoise = false"
            ),
            "unknown key",
        ),
        (GOOD.replace('researchers = ["alice"]', "researchers = []"), "researchers"),
        (GOOD.replace('researchers = ["alice"]', 'researchers = ["Alice Smith"]'), "researchers"),
        (GOOD + 'trusts = ["trust-z"]\n', "trusts"),
        (GOOD + 'trusts = ["trust-a", "trust-a"]\n', "twice"),
        (GOOD.replace("max_epsilon_per_query = 1.0", "max_epsilon_per_query = nan"), "max_epsilon"),
        (GOOD.replace("max_epsilon_per_query = 1.0", "max_epsilon_per_query = -1"), "max_epsilon"),
        (GOOD + "default_epsilon = 2.0\n", "default_epsilon"),
        (GOOD + "allow_partial = 1\n", "allow_partial"),
        (GOOD + "suppress_below = -1\n", "suppress_below"),
        (GOOD + "round_to = 0\n", "round_to"),
        (GOOD.replace('address = "127.0.0.1:5001"', 'address = "nowhere"'), "address"),
        (GOOD.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:99999"'), "listen"),
        (GOOD.replace('coordinator_id = "hub"', 'coordinator_id = "HUB!"'), "coordinator_id"),
        (GOOD.replace('key = "pki/coordinator-hub.key"\n', ""), "missing"),
        (GOOD.replace("[nodes.trust-a]", "[nodes.Trust_A]"), "node ids"),
        (
            GOOD.replace('state_dir = "state"', 'state_dir = "state"\ndeadline_seconds = 0'),
            "deadline_seconds",
        ),
    ],
)
def test_bad_configs_are_refused(tmp_path: Path, change: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_coordinator_config(_write(tmp_path, change))
    assert message in str(info.value)


NODE = """\
node_id = "trust-a"
database = "trust-a.duckdb"
state_dir = "state"
node_epsilon_ceiling = 10.0

[projects.study]
total_epsilon = 5.0
max_epsilon_per_query = 1.0
views = ["patients"]
max_tier = "general"
"""


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ('[server]\nlisten = "127.0.0.1:0"\n', "coordinator"),
        ('[server]\nlisten = "x"\ncoordinator = "hub"\n', "listen"),
        ('[server]\nlisten = "127.0.0.1:0"\ncoordinator = "hub"\nca = "ca.pem"\n', "all of"),
        ('[server]\nlisten = "127.0.0.1:0"\ncoordinator = "hub"\nplaintext = true\n', "unknown"),
        ('[server]\nlisten = "127.0.0.1:0"\ncoordinator = "hub"\nmax_workers = 0\n', "max_workers"),
    ],
)
def test_bad_node_server_sections_are_refused(tmp_path: Path, server: str, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(NODE + server)
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    assert message in str(info.value)
