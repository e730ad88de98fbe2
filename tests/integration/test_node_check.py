"""``fedtre node check`` and the checks ``serve`` runs: each mistake a new operator made (trust IT
issue) is one line saying what to fix, and ``serve`` refuses to start on it. Person-level files
are written 0600 in 0700 directories; interrupted loads leave nothing behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedtre.catalog import load_catalog
from fedtre.pki import Role, issue
from fedtre.synthetic import generate
from fedtre.tls import TlsFiles
from node.check import check_node
from node.config import load_node_config
from node.database import open_research_db
from node.engine import NodeEngine
from node.generation import marker_path
from node.loader import load_omop, remove_interrupted_loads
from tests.integration.federation import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def node_home(tmp_path: Path, node_db: Path, pki: Path) -> Callable[..., Path]:
    """A node directory with its own copy of the database and a config; ``write(**changes)``."""
    database = tmp_path / "node.duckdb"
    shutil.copyfile(node_db, database)
    database.chmod(0o600)

    def write(
        node_id: str = "trust-a",
        role: Role = Role.NODE,
        cert_name: str = "trust-a",
        key_of: str | None = None,
    ) -> Path:
        files = TlsFiles.in_pki_dir(pki, role, cert_name)
        key = TlsFiles.in_pki_dir(pki, Role.NODE, key_of).key if key_of else files.key
        config = tmp_path / "node.toml"
        config.write_text(
            f'node_id = "{node_id}"\ndatabase = "{database}"\nstate_dir = "state"\n'
            "node_epsilon_ceiling = 10.0\nanswer_slot_ms = 20\n\n"
            '[server]\nlisten = "127.0.0.1:0"\ncoordinator = "hub"\n'
            f'ca = "{files.ca}"\ncert = "{files.cert}"\nkey = "{key}"\n\n'
            "[projects.study]\ntotal_epsilon = 1.0\nmax_epsilon_per_query = 0.5\n"
            'views = ["patients"]\nmax_tier = "general"\n'
        )
        return config

    return write


def _fedtre(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedtre.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def test_a_good_node_passes(node_home: Callable[..., Path]) -> None:
    result = _fedtre("node", "check", "--config", str(node_home()))
    assert result.returncode == 0, result.stdout
    assert "node check passed" in result.stdout
    assert "PROBLEM" not in result.stdout
    assert "certificate: node 'trust-a'" in result.stdout


def test_a_certificate_near_its_end_passes_with_a_warning_to_rotate(
    node_home: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    soon = tmp_path / "soon"
    soon.mkdir()
    for name in ("ca.pem", "ca.key"):
        shutil.copy(pki / name, soon / name)
    issued = issue(soon, Role.NODE, "trust-a", valid_days=10)
    config = node_home()
    text = config.read_text()
    files = TlsFiles.in_pki_dir(pki, Role.NODE, "trust-a")
    config.write_text(
        text.replace(str(files.cert), str(issued.cert_path)).replace(
            str(files.key), str(issued.key_path)
        )
    )
    result = _fedtre("node", "check", "--config", str(config))
    assert result.returncode == 0, result.stdout
    warning = [line for line in result.stdout.splitlines() if "expires" in line]
    assert len(warning) == 1 and warning[0].startswith("WARNING  [server] cert node-trust-a.pem")
    assert "(9 days)" in warning[0]
    assert "rotating certificates" in warning[0]


def _assert_problem(config: Path, says: str) -> None:
    checked = _fedtre("node", "check", "--config", str(config))
    assert checked.returncode == 3, checked.stdout
    problems = [line for line in checked.stdout.splitlines() if line.startswith("PROBLEM")]
    assert any(says in line for line in problems), checked.stdout
    # serve runs the same checks and refuses to start, before it listens
    ready = config.parent / "ready.json"
    served = _fedtre(
        "node", "serve", "--config", str(config), "--ready-file", str(ready), timeout=60
    )
    assert served.returncode == 3 and "refusing to serve" in served.stderr, served.stderr
    assert not ready.exists()


def test_another_trusts_certificate_is_refused(node_home: Callable[..., Path]) -> None:
    _assert_problem(node_home(node_id="trust-b"), "is for node 'trust-a'")


def test_the_coordinators_certificate_as_the_nodes_is_refused(
    node_home: Callable[..., Path],
) -> None:
    _assert_problem(node_home(role=Role.COORDINATOR, cert_name="hub"), "coordinator certificate")


def test_a_key_that_does_not_match_the_certificate_is_refused(
    node_home: Callable[..., Path],
) -> None:
    _assert_problem(node_home(key_of="trust-b"), "does not belong")


def test_a_key_readable_by_others_is_refused(node_home: Callable[..., Path], pki: Path) -> None:
    config = node_home()
    key = TlsFiles.in_pki_dir(pki, Role.NODE, "trust-a").key
    key.chmod(0o644)
    try:
        _assert_problem(config, f"chmod 600 {key}")
    finally:
        key.chmod(0o600)


def test_a_database_readable_by_others_or_missing_is_refused(
    node_home: Callable[..., Path], tmp_path: Path
) -> None:
    config = node_home()
    database = tmp_path / "node.duckdb"
    database.chmod(0o644)
    _assert_problem(config, "readable by other users")
    database.unlink()
    _assert_problem(config, "run fedtre node load")


def test_a_state_directory_open_to_others_is_refused(
    node_home: Callable[..., Path], tmp_path: Path
) -> None:
    config = node_home()
    (tmp_path / "state").mkdir(mode=0o755)
    (tmp_path / "state").chmod(0o755)
    _assert_problem(config, "chmod 700")


def test_state_files_are_private(node_home: Callable[..., Path], tmp_path: Path) -> None:
    engine = NodeEngine(load_node_config(node_home()))
    engine.close()
    state = tmp_path / "state"
    assert _mode(state) == 0o700
    assert _mode(state / "ledger.sqlite") == 0o600
    assert _mode(state / "audit.key") == 0o600  # the audit log is in ledger.sqlite


def test_the_loader_writes_a_private_database_and_cleans_up_interrupted_loads(
    tmp_path: Path, omop_dir: Path, catalog
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "db" / "node.duckdb"
    out.parent.mkdir()
    # left by a load that was SIGKILLed (its process is gone) and by one still running (us)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    leftovers = [
        out.parent / f".node.duckdb.tmp-{dead}",
        out.parent / f".node.duckdb.tmp-{dead}.wal",
    ]
    spill = out.parent / f".node.duckdb.tmp-{dead}.spill"
    spill.mkdir()
    for path in leftovers:
        path.write_bytes(b"person-level data")
    running = out.parent / f".node.duckdb.tmp-{os.getpid()}-other"
    running.write_bytes(b"a load in progress")
    lines: list[str] = []
    load_omop(omop_dir, out, catalog, progress=lines.append)
    assert not any(p.exists() for p in [*leftovers, spill])
    assert running.exists()  # a live process's files are left alone
    assert any("interrupted load" in line for line in lines)
    assert _mode(out) == 0o600
    assert remove_interrupted_loads(out) == 0


@pytest.mark.slow
def test_a_load_stopped_with_sigterm_leaves_no_person_level_files(tmp_path: Path) -> None:
    omop = tmp_path / "omop"
    generate(omop, 60_000, seed=3)
    out = tmp_path / "db" / "node.duckdb"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedtre.cli",
            "node",
            "load",
            "--source",
            str(omop),
            "--out",
            str(out),
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.parent.glob(".node.duckdb.tmp-*")):
        time.sleep(0.05)
    assert list(out.parent.glob(".node.duckdb.tmp-*")), "the load never started writing"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    left = sorted(p.name for p in out.parent.glob(".node.duckdb.tmp-*"))
    assert left == [], f"exit {proc.returncode}; left {left}\n{output[-2000:]}"
    if out.exists():  # the load got as far as replacing the database: then it is complete
        open_research_db(out, load_catalog()).close()
        assert _mode(out) == 0o600


def _coordinator_config(tmp_path: Path, pki: Path, role: Role, name: str) -> Path:
    files = TlsFiles.in_pki_dir(pki, role, name)
    config = tmp_path / "coordinator.toml"
    config.write_text(
        'coordinator_id = "hub"\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n\n'
        f'[tls]\nca = "{files.ca}"\ncert = "{files.cert}"\nkey = "{files.key}"\n\n'
        '[nodes.trust-a]\nmode = "dial-out"\n\n'
        '[projects.study]\nresearchers = ["alice"]\nmax_epsilon_per_query = 1.0\n'
    )
    return config


def test_the_coordinator_check_passes_and_refuses_like_the_nodes(tmp_path: Path, pki: Path) -> None:
    good = _coordinator_config(tmp_path, pki, Role.COORDINATOR, "hub")
    checked = _fedtre("coordinator", "check", "--config", str(good))
    assert checked.returncode == 0, checked.stdout
    assert "certificate: coordinator 'hub'" in checked.stdout
    bad = _coordinator_config(tmp_path, pki, Role.NODE, "trust-a")
    checked = _fedtre("coordinator", "check", "--config", str(bad))
    assert checked.returncode == 3 and "is a node certificate" in checked.stdout, checked.stdout
    ready = tmp_path / "ready.json"
    served = _fedtre("coordinator", "serve", "--config", str(bad), "--ready-file", str(ready))
    assert served.returncode == 3 and "refusing to serve" in served.stderr
    assert not ready.exists()


def _normal(line: str) -> str:
    """A check line without what differs between machines: paths, user ids, dates, day counts,
    addresses, the catalog version and the slot. Modes (0644, chmod 600) and the rest must
    match."""
    line = re.sub(r"(?:[\w.-]*/)+[\w.-]+|[\w.-]+\.(?:pem|key|duckdb|toml|json)\b", "<path>", line)
    line = re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "<address>", line)
    line = re.sub(r"\buid \d+", "uid <n>", line)
    line = re.sub(r"\d{4}-\d\d-\d\d", "<date>", line)
    line = re.sub(r"\(\d+ days\)", "(<n> days)", line)
    line = re.sub(r"catalog \d+\.\d+\.\d+", "catalog <version>", line)
    line = re.sub(r"answer slot \d+ ms", "answer slot <n> ms", line)
    return re.sub(
        r"ledger [0-9a-f]{8} in <path> with \d+ released",
        "ledger <id> in <path> with <n> released",
        line,
    )


def _readme_check_lines() -> list[str]:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## For trust IT", 1)[1].split("\n## ", 1)[0]
    return [
        line
        for line in section.splitlines()
        if line.startswith(("ok       ", "PROBLEM  ", "WARNING  "))
    ]


def test_the_readme_shows_what_node_check_really_says(
    node_home: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    """Every check line README shows for trust IT is one the check prints (paths, numbers and
    dates aside), for a good config and for each mistake in the issue's table."""
    said: set[str] = set()

    def check(config: Path) -> None:
        said.update(_normal(line) for line in check_node(config).lines())

    config = node_home()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    check(config)  # good
    check(node_home(node_id="trust-b"))  # another trust's certificate
    check(node_home(role=Role.COORDINATOR, cert_name="hub"))  # the coordinator's
    check(node_home(key_of="trust-b"))  # a key that is not this certificate's
    config = node_home()
    key = TlsFiles.in_pki_dir(pki, Role.NODE, "trust-a").key
    database = tmp_path / "node.duckdb"
    for path, mode in ((key, 0o644), (database, 0o644), (state, 0o755)):
        path.chmod(mode)
        check(config)
        path.chmod(0o700 if path.is_dir() else 0o600)
    if os.geteuid() == 0:  # a key owned by another user
        os.chown(key, 12345, -1)
        check(config)
        os.chown(key, 0, -1)
    marker = marker_path(load_node_config(config))  # a node that released answers, then
    marker.write_text('{"ledger_id": "3f2a9c1e", "committed": 42, "state_dir": "state"}')
    state.rmdir()  # lost its state directory
    check(config)
    marker.unlink()
    soon = tmp_path / "soon"
    soon.mkdir()
    for name in ("ca.pem", "ca.key"):
        shutil.copy(pki / name, soon / name)
    issued = issue(soon, Role.NODE, "trust-a", valid_days=10)
    config.write_text(
        config.read_text()
        .replace(str(TlsFiles.in_pki_dir(pki, Role.NODE, "trust-a").cert), str(issued.cert_path))
        .replace(str(key), str(issued.key_path))
    )
    check(config)
    shown = _readme_check_lines()
    assert len(shown) >= 12
    missing = [line for line in shown if _normal(line) not in said]
    assert not missing, (
        "README shows check lines the check never prints:\n"
        + "\n".join(missing)
        + "\n\nit prints:\n"
        + "\n".join(sorted(said))
    )
