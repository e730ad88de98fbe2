"""Invalid catalogs and node configs are refused at start-up with a message naming the place."""

from __future__ import annotations

import copy
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from fedtre.catalog import ColumnType, Tier, load_catalog, parse_catalog
from fedtre.errors import ConfigError
from node.config import load_node_config
from tests.conftest import write_node_config

BUILTIN = tomllib.loads(resources.files("fedtre").joinpath("data/catalog.toml").read_text())


def test_builtin_catalog_is_valid(catalog):
    assert set(catalog.views) == {"patients", "conditions", "visits"}
    assert catalog.views["patients"].max_rows_per_person == 1
    group = catalog.views["conditions"].columns["condition_group"]
    assert group.type is ColumnType.CATEGORY
    assert group.tier_of("self_harm") is Tier.HIGHLY_SENSITIVE
    assert group.tier_of("depression") is Tier.MENTAL_HEALTH
    assert catalog.views["visits"].columns["mental_health"].group_domain == (False, True)
    assert len(catalog.digest) == 64


def _mutated(mutate):
    data = copy.deepcopy(BUILTIN)
    mutate(data)
    return data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("version"), "missing key(s) version"),
        (lambda d: d.update(extra=1), "unknown key(s) extra"),
        (lambda d: d["views"]["patients"].update(colour="red"), "views.patients: unknown key"),
        (lambda d: d["views"]["patients"].update(max_rows_per_person=0), "max_rows_per_person"),
        (lambda d: d["views"]["patients"].update(tier="secret"), "views.patients.tier"),
        (
            lambda d: d["views"]["patients"]["columns"]["age"].update(min=200),
            "min must be below max",
        ),
        (
            lambda d: d["views"]["patients"]["columns"]["sex"].update(domain=["a", "a"]),
            "distinct",
        ),
        (
            lambda d: d["views"]["patients"]["columns"]["sex"].update(type="text"),
            "must be one of category",
        ),
        (
            lambda d: d["views"]["patients"]["columns"].update(person_id={"type": "integer"}),
            "privacy unit",
        ),
        (
            lambda d: d["views"]["patients"]["columns"].update({"Bad Name": {"type": "boolean"}}),
            "lower-case",
        ),
        (
            lambda d: d["views"]["conditions"]["columns"]["condition_group"]["value_tiers"].update(
                unicorn="general"
            ),
            "not in the column's domain",
        ),
        (lambda d: d.update(privacy_unit="household_id"), "privacy_unit"),
    ],
)
def test_invalid_catalog_refused_with_clear_message(mutate, message):
    with pytest.raises(ConfigError, match=None) as info:
        parse_catalog(_mutated(mutate), source="cat.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("cat.toml")


def test_unreadable_and_non_toml_catalogs(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read catalog"):
        load_catalog(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("version = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_catalog(bad)


def test_node_config_valid(tmp_path: Path, node_db: Path):
    config = load_node_config(write_node_config(tmp_path, node_db))
    assert config.node_id == "trust-test"
    assert config.projects["study"].total_units == 5_000_000
    assert config.projects["study"].max_tier is Tier.HIGHLY_SENSITIVE


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t + "\ncolour = 'red'\n", "unknown key(s) colour"),
        (lambda t: t.replace('node_id = "trust-test"', 'node_id = "Trust A"'), "node_id"),
        (lambda t: t.replace("total_epsilon = 5.0", "total_epsilon = -1"), "total_epsilon"),
        (lambda t: t.replace("total_epsilon = 5.0", "total_epsilon = 0.5"), "above total"),
        (lambda t: t.replace('max_tier = "highly_sensitive"', 'max_tier = "x"'), "max_tier"),
        (lambda t: t.replace('"visits"]', '"lab_results"]'), "not in the catalog"),
        (lambda t: t.replace("title =", "titel ="), "unknown key(s) titel"),
        (lambda t: t.replace("node_epsilon_ceiling = 100.0\n", ""), "node_epsilon_ceiling"),
        (lambda t: t.replace("[projects.study]", "[projects.Study]"), "project ids"),
    ],
)
def test_invalid_node_config_refused(tmp_path: Path, node_db: Path, edit, message):
    path = write_node_config(tmp_path, node_db)
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    assert message in str(info.value)


def test_example_config_in_deploy_is_valid():
    config = load_node_config(Path(__file__).parents[2] / "deploy" / "node.example.toml")
    assert config.node_id == "trust-a"


@pytest.mark.parametrize("key", ["node_epsilon_ceiling = 100.0", "total_epsilon = 5.0"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_epsilon_in_config_refused(tmp_path: Path, node_db: Path, key, value):
    path = write_node_config(tmp_path, node_db)
    name = key.split(" = ")[0]
    path.write_text(path.read_text().replace(key, f"{name} = {value}"))
    with pytest.raises(ConfigError, match=name):
        load_node_config(path)
