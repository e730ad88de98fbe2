"""Run SmartNoise SQL queries from the project's own Python, in a separate virtualenv.

SmartNoise SQL 1.0.10 pins ``opendp<0.15`` and ``pandas<3`` while fedtre uses opendp 0.16, so
SmartNoise lives in its own virtualenv (by default ``benchmarks/.venv-smartnoise``). It also
switches on an OpenDP feature flag globally, so each call runs ``smartnoise_runner.py`` in a
fresh process of that virtualenv, with a JSON request on stdin and a JSON reply on stdout.

This module uses the standard library only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: Default location of the SmartNoise virtualenv.
DEFAULT_VENV: Path = Path(__file__).parent / ".venv-smartnoise"

#: Path of the script run inside the SmartNoise virtualenv.
RUNNER: Path = Path(__file__).parent / "smartnoise_runner.py"

#: Packages installed into the SmartNoise virtualenv (pip requirement specifiers).
REQUIREMENTS: tuple[str, ...] = (
    "smartnoise-sql==1.0.10",
    "opendp<0.15",
    "pandas<3",
    "duckdb",
    "pyarrow",
)

#: Marker file written once the requirements are installed, so a broken install is redone.
_MARKER = ".fedtre-smartnoise-installed"


class SmartNoiseError(RuntimeError):
    """Raised when the SmartNoise runner fails or replies with an error."""


def _log(message: str) -> None:
    """Print a progress message to stderr."""
    print(f"[smartnoise_env] {message}", file=sys.stderr, flush=True)


def _venv_python(path: Path) -> Path:
    """Return the path of the Python interpreter inside the virtualenv at ``path``."""
    if sys.platform == "win32":
        return path / "Scripts" / "python.exe"
    return path / "bin" / "python"


def _run_logged(cmd: list[str]) -> None:
    """Run ``cmd``, streaming its output to stderr; raise :class:`SmartNoiseError` on failure."""
    _log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if proc.returncode != 0:
        raise SmartNoiseError(f"command failed with exit code {proc.returncode}: {cmd}")


def _write_gitignore(path: Path) -> None:
    """Keep the virtualenv out of git with a ``.gitignore`` inside it (as Python 3.13 does)."""
    gitignore = path / ".gitignore"
    if path.is_dir() and not gitignore.exists():
        gitignore.write_text("# created by benchmarks/smartnoise_env.py\n*\n")


def ensure_venv(path: Path = DEFAULT_VENV, base_python: str | None = None) -> Path:
    """Create the SmartNoise virtualenv at ``path`` if needed and return its Python path.

    The virtualenv is created with ``python -m venv`` (using ``base_python``, by default the
    interpreter running this code) and the packages in :data:`REQUIREMENTS` are installed with
    pip. A marker file records a completed install, so an interrupted install is resumed on the
    next call, and a ``.gitignore`` inside the virtualenv keeps it out of git. Progress is
    printed to stderr.
    """
    path = Path(path)
    python = _venv_python(path)
    marker = path / _MARKER
    if python.exists() and marker.exists():
        _write_gitignore(path)
        return python
    start = time.perf_counter()
    if not python.exists():
        _log(f"creating virtualenv at {path}")
        _run_logged([base_python or sys.executable, "-m", "venv", str(path)])
    _write_gitignore(path)
    _log("installing " + " ".join(REQUIREMENTS) + " (this takes a minute or two)")
    _run_logged([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    _run_logged([str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS])
    marker.write_text(json.dumps({"requirements": list(REQUIREMENTS)}) + "\n")
    _log(f"virtualenv ready in {time.perf_counter() - start:.1f} s: {python}")
    return python


def run_smartnoise(
    data_path: Path,
    table: str,
    metadata: dict[str, Any],
    queries: list[dict[str, Any]],
    repeats: int,
    reader: str = "duckdb",
    venv: Path = DEFAULT_VENV,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``queries`` through SmartNoise SQL on the Parquet file ``data_path``.

    Args:
        data_path: Parquet file holding the table.
        table: Table name used in the queries as ``fedtre.<table>``.
        metadata: Simple table description, e.g. ``{"row_privacy": false, "max_ids": 1,
            "key": "person_id", "columns": {"age": {"type": "int", "lower": 0, "upper": 110},
            "person_id": {"type": "int", "private_id": true}}}``.
        queries: Items ``{"name": str, "sql": str, "epsilon": float}`` (optionally ``"delta"``).
        repeats: Number of times each query is executed.
        reader: ``"duckdb"`` (in-memory DuckDB table) or ``"pandas"`` (pandas DataFrame).
        venv: Location of the SmartNoise virtualenv, created if missing.
        timeout: Optional timeout in seconds for the runner process.

    Returns:
        The runner's parsed JSON reply: ``{"smartnoise_version", "opendp_version", "reader",
        "load_seconds", "results": [{"name", "sql", "epsilon", "delta", "seconds", "columns",
        "rows", "epsilon_spent_per_run", "delta_spent_per_run", ...}]}``.

    Raises:
        SmartNoiseError: If the runner exits non-zero or replies with an error.
    """
    python = ensure_venv(venv)
    request = {
        "data_path": str(Path(data_path).resolve()),
        "table": table,
        "metadata": metadata,
        "queries": queries,
        "repeats": repeats,
        "reader": reader,
    }
    proc = subprocess.run(
        [str(python), str(RUNNER)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    try:
        reply: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise SmartNoiseError(
            f"runner exited {proc.returncode} without a JSON reply; stderr:\n{proc.stderr[-4000:]}"
        ) from None
    if proc.returncode != 0 or "error" in reply:
        raise SmartNoiseError(
            f"runner exited {proc.returncode}: {reply.get('error')}\n{proc.stderr[-4000:]}"
        )
    return reply
