"""Reading operator-supplied TOML files strictly: shared by node, coordinator and client configs.

Unknown keys are refused (a typo must never silently weaken policy), missing keys are named, and
relative paths are relative to the file that names them.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtre.errors import ConfigError

LISTEN = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})\Z")


def read_toml(path: Path | str, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def check_keys(spec: Mapping[str, Any], where: str, required: set[str], allowed: set[str]) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    missing = sorted(required - set(spec))
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")


def resolve_path(raw: Any, base_dir: Path, where: str) -> Path:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}: paths must be non-empty strings")
    p = Path(raw).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


def parse_listen(raw: Any, where: str) -> str:
    match = LISTEN.match(raw) if isinstance(raw, str) else None
    if match is None or int(match.group(2)) > 65535:
        raise ConfigError(f"{where}: must look like '127.0.0.1:50051' (port 0: any free port)")
    return str(raw)


def parse_metrics(data: Mapping[str, Any], source: str) -> str:
    """The optional ``[metrics]`` section of a node's or the coordinator's config: its
    ``listen`` address, or "" without one."""
    if "metrics" not in data:
        return ""
    spec = data["metrics"]
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: [metrics] must be a table")
    check_keys(spec, f"{source}: metrics", {"listen"}, {"listen"})
    return parse_listen(spec["listen"], f"{source}: metrics.listen")


def settings_digest(data: Mapping[str, Any]) -> str:
    """SHA-256 of settings as read (canonical JSON): names a configuration without showing it."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
