"""Shared fixtures: a small synthetic trust loaded once per session, and fresh node engines."""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedtre.catalog import Catalog, load_catalog
from fedtre.request import QueryRequest
from fedtre.synthetic import generate
from node.config import NodeConfig, load_node_config
from node.database import open_research_db
from node.engine import NodeEngine
from node.loader import load_omop

FIXTURE_PERSONS = 3000


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="session")
def omop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("omop")
    generate(out, FIXTURE_PERSONS, seed=11)
    return out


@pytest.fixture(scope="session")
def reference(node_db: Path, catalog: Catalog):
    """The spec reference (tests/spec/reference.py) over the session's synthetic trust."""
    from tests.spec.reference import Reference

    return Reference.from_db(node_db, catalog)


@pytest.fixture(scope="module")
def research_con(node_db: Path, catalog: Catalog) -> Iterator[object]:
    """A node connection, locked down exactly as the engine opens it."""
    con = open_research_db(node_db, catalog)
    yield con
    con.close()


@pytest.fixture(scope="session")
def node_db(tmp_path_factory: pytest.TempPathFactory, omop_dir: Path, catalog: Catalog) -> Path:
    out = tmp_path_factory.mktemp("nodedb") / "node.duckdb"
    load_omop(omop_dir, out, catalog)
    return out


def private_database(directory: Path, source: Path) -> Path:
    """The database of one test's node: a hard link to ``source`` in ``directory``. Each node
    keeps the record of its ledger beside its own database (``node.generation``), so nodes with
    different state directories must not share a database path."""
    directory.mkdir(parents=True, exist_ok=True)
    local = directory / source.name
    if not local.exists():
        try:
            os.link(source, local)
        except OSError:  # another file system
            shutil.copyfile(source, local)
            local.chmod(0o600)
    return local


def write_node_config(
    directory: Path,
    database: Path,
    *,
    total_epsilon: float = 5.0,
    max_epsilon_per_query: float = 1.0,
    node_ceiling: float = 100.0,
    max_tier: str = "highly_sensitive",
    views: tuple[str, ...] = ("patients", "conditions", "visits"),
    answer_slot_ms: int = 1,
    min_epsilon_per_query: float = 0.001,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    database = private_database(directory, database)
    path = directory / "node.toml"
    view_list = ", ".join(f'"{v}"' for v in views)
    path.write_text(
        textwrap.dedent(
            f"""\
            node_id = "trust-test"
            database = "{database}"
            state_dir = "{directory / "state"}"
            node_epsilon_ceiling = {node_ceiling}
            answer_slot_ms = {answer_slot_ms}
            min_epsilon_per_query = {min_epsilon_per_query}

            [projects.study]
            title = "Test study"
            total_epsilon = {total_epsilon}
            max_epsilon_per_query = {max_epsilon_per_query}
            views = [{view_list}]
            max_tier = "{max_tier}"
            """
        )
    )
    return path


@pytest.fixture
def node_config_factory(tmp_path: Path, node_db: Path) -> Callable[..., NodeConfig]:
    counter = iter(range(10_000))

    def make(**kwargs: object) -> NodeConfig:
        path = write_node_config(tmp_path / f"node{next(counter)}", node_db, **kwargs)  # type: ignore[arg-type]
        return load_node_config(path)

    return make


@pytest.fixture
def engine(node_config_factory: Callable[..., NodeConfig]) -> Iterator[NodeEngine]:
    eng = NodeEngine(node_config_factory())
    yield eng
    eng.close()


def request(sql: str, epsilon: float = 0.1, query_id: str = "q-1", project: str = "study"):
    return QueryRequest(
        query_id=query_id, project_id=project, sql=sql, epsilon=epsilon, caller="test"
    )
