"""The projects researchers may query: from the signed registry (``[governance]``), or the
hand-kept ``[projects]`` of a development coordinator.

With governance, the registry is read again whenever its files change, so a project approved
(or revoked) by the committee takes effect without a restart. The coordinator checks each
approval itself, to refuse early and say why; it forwards the approval bundle with every
request, and every node checks it again against its own pinned keys (the nodes do not trust
this check).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coordinator.combine import OutputRules
from coordinator.config import CoordinatorConfig, Project
from fedtre import logs
from fedtre.errors import ConfigError, QueryRefused, Refusal
from fedtre.governance.bundle import Bundle
from fedtre.governance.documents import Application, DocumentError
from fedtre.governance.registry import APPLICATION, STATEMENTS, Registry
from fedtre.governance.verify import NotApproved, check

log = logs.get("coordinator")
NO_PROJECT = "No project with that id is open to you. Ask the project lead to add your name."


@dataclass(frozen=True)
class Listed:
    project: Project
    approval: bytes  # the bundle to send to the trusts (empty for a hand-kept project)
    application: Application | None = None


class ProjectBook:
    def __init__(
        self,
        config: CoordinatorConfig,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self._now = now
        self._lock = threading.Lock()
        # project -> (registry files' stamp, project, why not approved, verdict good until)
        self._cache: dict[str, tuple[tuple[int, ...], Listed | None, str, dt.datetime]] = {}

    def for_researcher(self, researcher: str, project_id: str) -> Listed:
        """The project, approved now, if ``researcher`` is named on it; refuses otherwise."""
        if self.config.governance is None:
            project = self.config.projects.get(project_id)
            if project is None or researcher not in project.researchers:
                raise QueryRefused(Refusal.NOT_AUTHORISED, NO_PROJECT)
            return Listed(project, b"")
        listed, why = self._load(project_id)
        if listed is None:
            raise QueryRefused(Refusal.NOT_AUTHORISED, NO_PROJECT)
        if researcher not in listed.project.researchers:
            raise QueryRefused(Refusal.NOT_AUTHORISED, NO_PROJECT)
        if why:
            raise NotApproved(why)
        return listed

    def approved(self) -> list[Listed]:
        """Every project approved now (health, listings)."""
        if self.config.governance is None:
            return [Listed(p, b"") for _, p in sorted(self.config.projects.items())]
        out = []
        for pid in Registry(self.config.governance.registry).projects():
            listed, why = self._load(pid)
            if listed is not None and not why:
                out.append(listed)
        return out

    def _load(self, project_id: str) -> tuple[Listed | None, str]:
        """(the project as applied for, "" if approved now or why not)."""
        gov = self.config.governance
        assert gov is not None
        registry = Registry(gov.registry)
        try:
            stamp = _stamp(registry.root / project_id)
        except ConfigError:
            return None, ""
        now = self._now()
        with self._lock:
            cached = self._cache.get(project_id)
        if cached is not None and cached[0] == stamp:
            listed = cached[1]
            if listed is None or now < cached[3]:
                return listed, cached[2]
        else:
            try:
                bundle = registry.bundle(project_id)
                app = bundle.parsed()
            except (ConfigError, DocumentError) as exc:
                log.warning(
                    "registry entry unreadable", extra={"project": project_id, "error": str(exc)}
                )
                return None, ""
            listed = Listed(self._project(app), bundle.to_bytes(), app)
        why, until = self._recheck(listed, now)
        with self._lock:
            self._cache[project_id] = (stamp, listed, why, until)
        return listed, why

    def _recheck(self, listed: Listed, now: dt.datetime) -> tuple[str, dt.datetime]:
        """(why not approved, or ""; until when that verdict stands on these documents)."""
        gov = self.config.governance
        assert gov is not None
        if not listed.project.trusts:
            return "none of the project's trusts is linked to this coordinator", now
        try:
            approved = check(Bundle.from_bytes(listed.approval), gov.committee, now)
        except NotApproved as exc:
            return str(exc), now  # checked again next time: a renewal may arrive
        return "", approved.holds_until

    def _project(self, app: Application) -> Project:
        trusts = tuple(t for t in app.trusts if t in self.config.nodes)
        missing = sorted(set(app.trusts) - set(trusts))
        if missing:
            log.warning(
                "project names trusts this coordinator has no link to",
                extra={"project": app.project_id, "trusts": missing},
            )
        return Project(
            project_id=app.project_id,
            title=app.title,
            researchers=frozenset(app.researchers),
            trusts=trusts,
            max_units_per_query=app.max_units_per_query,
            default_units=app.default_units,
            allow_partial=app.allow_partial,
            rules=OutputRules(suppress_below=app.suppress_below, round_to=app.round_to),
            views=tuple(sorted(app.views)),
            max_tier=app.max_tier.value,
        )


def _stamp(directory: Path) -> tuple[int, ...]:
    """Changes whenever the application or a statement is added, replaced or removed."""
    out: list[int] = []
    for path in (directory, directory / APPLICATION, directory / STATEMENTS):
        try:
            st = path.stat()
        except FileNotFoundError:
            if path.name == STATEMENTS:
                out += [0, 0]
                continue
            raise ConfigError(f"{path} is missing") from None
        out += [st.st_mtime_ns, st.st_ino]
    return tuple(out)
