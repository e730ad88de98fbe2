"""Which projects this node serves, and within what scope: from signed approvals (governance),
or from the hand-kept ``[projects.*]`` of a development node.

With ``[governance]``, every request carries the project's approval bundle (the coordinator
sends it; nothing in it is trusted until checked). The node checks it against its own pinned
committee keys and policy, its own participation rules and the revocations it has imported
itself, then derives the project's scope and budget from the application. The latest bundle that
passed is kept in the state directory (``approvals/<project>.json``), so that budget reports and
``fedtre node budget`` work between queries; it is checked again every time it is used.

Revocations imported by the trust (``fedtre node approvals import``, into ``revocations/``) take
effect from the next request, even when the coordinator never sends them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedtre.errors import ConfigError, QueryRefused, Refusal
from fedtre.governance.bundle import Bundle
from fedtre.governance.documents import DocumentError, Kind, Signed, digest
from fedtre.governance.verify import Approved, NotApproved, check
from fedtre.pki import write_file
from node.config import GovernanceSettings, NodeConfig, ProjectPolicy

APPROVALS, REVOCATIONS = "approvals", "revocations"
UNKNOWN = "This trust has no approved project with that id."


@dataclass(frozen=True)
class Verified:
    policy: ProjectPolicy
    approved: Approved | None  # None for a hand-kept project


class Projects:
    """The projects of one node; ``for_request`` is the check made on every query."""

    def __init__(
        self,
        config: NodeConfig,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self.governance: GovernanceSettings | None = config.governance
        self._now = now
        self._lock = threading.Lock()
        self._stored: dict[str, bytes] = {}  # project -> last bundle that passed (as stored)
        # (the directory's stat, a generation number, the revocations): reloaded on change
        self._revocations: tuple[tuple[int, int], int, tuple[Signed, ...]] = ((-1, -1), 0, ())
        # Verdicts that passed, by (bundle, revocation list); used until they could change.
        self._verified: dict[tuple[bytes, int], tuple[Verified, dt.datetime]] = {}
        if self.governance is not None:
            for d in (self._dir(APPROVALS), self._dir(REVOCATIONS)):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- every request ---------------------------------------------------------------------

    def for_request(self, project_id: str, approval: bytes) -> Verified:
        """The project as approved now; refuses (data-free, plain words) otherwise."""
        if self.governance is None:
            return Verified(self._configured(project_id), None)
        if not approval:
            stored = self._stored_bundle(project_id)
            if stored is None:
                raise QueryRefused(
                    Refusal.UNKNOWN_PROJECT,
                    "The request carries no approval, and this trust holds none for that project.",
                )
            approval = stored
        verified = self._verify(project_id, approval)
        self._store(project_id, approval)
        return verified

    def known(self, project_id: str) -> Verified:
        """A project this node has seen approved (budget reports, describe): checked again."""
        if self.governance is None:
            return Verified(self._configured(project_id), None)
        stored = self._stored_bundle(project_id)
        if stored is None:
            raise QueryRefused(Refusal.UNKNOWN_PROJECT, UNKNOWN)
        return self._verify(project_id, stored)

    def ids(self) -> tuple[str, ...]:
        """Projects this node serves now (hand-kept, or stored approvals that still hold)."""
        if self.governance is None:
            return tuple(sorted(self.config.projects))
        out = []
        for path in sorted(self._dir(APPROVALS).glob("*.json")):
            try:
                self.known(path.stem)
            except (QueryRefused, NotApproved):
                continue
            out.append(path.stem)
        return tuple(out)

    # -- the trust's own imports -----------------------------------------------------------

    def import_file(self, path: Path) -> str:
        """Import a revocation (signed statement) or an approval bundle; verified first.
        Returns what was imported, in words."""
        gov = self._governance()
        try:
            data = Path(path).read_bytes()
            doc = json.loads(data.decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: not a JSON document ({exc})") from None
        if isinstance(doc, dict) and doc.get("kind", "").startswith("fedtre.approval-bundle"):
            bundle = Bundle.from_bytes(data)
            app = bundle.parsed()
            self._verify(app.project_id, data)
            self._store(app.project_id, data)
            return f"approval of {app.project_id} (checked: it holds at this trust)"
        try:
            signed = Signed.from_json(doc)
            statement = signed.statement()
        except DocumentError as exc:
            raise ConfigError(
                f"{path}: neither an approval bundle nor a revocation ({exc})"
            ) from None
        member = gov.committee.by_key_id(signed.key_id)
        if statement.kind is not Kind.REVOCATION:
            raise ConfigError(f"{path}: a signed {statement.kind.value}, not a revocation")
        if member is None or not member.key.verify(signed.signature, signed.body):
            raise ConfigError(
                f"{path}: not signed by a member of this node's committee; not imported"
            )
        target = self._dir(REVOCATIONS) / f"{digest(signed.body)[:32]}.json"
        write_file(target, json.dumps(signed.to_json()).encode(), private=True, overwrite=True)
        _fsync_dir(target.parent)
        return (
            f"revocation of {statement.project_id} by {member.name} "
            f"({member.role.value}); effective from the next query"
        )

    def revocations(self) -> tuple[Signed, ...]:
        return self._revocation_list()[1]

    def _revocation_list(self) -> tuple[int, tuple[Signed, ...]]:
        """(generation, revocations): the generation changes whenever the list is reloaded."""
        directory = self._dir(REVOCATIONS)
        try:
            st = directory.stat()
        except FileNotFoundError:
            return 0, ()
        key = (st.st_mtime_ns, st.st_ino)
        with self._lock:
            if self._revocations[0] == key:
                return self._revocations[1], self._revocations[2]
        loaded = []
        for path in sorted(directory.glob("*.json")):
            try:
                loaded.append(Signed.from_json(json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, DocumentError):
                # an unreadable revocation must not be ignored silently: refuse everything
                raise QueryRefused(
                    Refusal.NOT_AUTHORISED,
                    "This trust cannot read its own revocation list; it serves no project "
                    "until its operators repair it.",
                ) from None
        with self._lock:
            generation = self._revocations[1] + 1
            self._revocations = (key, generation, tuple(loaded))
        return generation, tuple(loaded)

    # -- inside ------------------------------------------------------------------------------

    def _verify(self, project_id: str, approval: bytes) -> Verified:
        generation, revocations = self._revocation_list()
        key = (approval, generation)
        now = self._now()
        with self._lock:
            cached = self._verified.get(key)
        if cached is not None and now < cached[1] and cached[0].policy.project_id == project_id:
            return cached[0]
        verified = self._verify_now(project_id, approval, revocations, now)
        assert verified.approved is not None
        with self._lock:
            if len(self._verified) > 256:
                self._verified.clear()
            self._verified[key] = (verified, verified.approved.holds_until)
        return verified

    def _verify_now(
        self, project_id: str, approval: bytes, revocations: tuple[Signed, ...], now: dt.datetime
    ) -> Verified:
        gov = self._governance()
        try:
            bundle = Bundle.from_bytes(approval)
        except DocumentError as exc:
            raise NotApproved(f"the approval sent with the request is malformed: {exc}") from None
        approved = check(bundle, gov.committee, now, trust=gov.trust, revocations=revocations)
        app = approved.application
        if app.project_id != project_id:
            raise NotApproved("the approval sent with the request is for another project")
        unknown = sorted(set(app.views) - set(self.config.catalog.views))
        if unknown:
            raise NotApproved(
                f"the approval names views this trust's catalog lacks: {', '.join(unknown)}"
            )
        total = app.total_units
        cap = gov.project_caps.get(project_id)
        if cap is not None:
            total = min(total, cap)
        per_query = min(app.max_units_per_query, total)
        if per_query < self.config.min_units_per_query:
            raise NotApproved("the approval's ε per query is below this trust's minimum per query")
        policy = ProjectPolicy(
            project_id=project_id,
            title=app.title,
            total_units=total,
            max_units_per_query=per_query,
            views=frozenset(app.views),
            max_tier=app.max_tier,
        )
        return Verified(policy, approved)

    def _configured(self, project_id: str) -> ProjectPolicy:
        project = self.config.projects.get(project_id)
        if project is None:
            raise QueryRefused(Refusal.UNKNOWN_PROJECT, UNKNOWN)
        return project

    def _stored_bundle(self, project_id: str) -> bytes | None:
        with self._lock:
            if project_id in self._stored:
                return self._stored[project_id]
        path = self._dir(APPROVALS) / f"{project_id}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        with self._lock:
            self._stored[project_id] = data
        return data

    def _store(self, project_id: str, approval: bytes) -> None:
        if self._stored_bundle(project_id) == approval:
            return
        path = self._dir(APPROVALS) / f"{project_id}.json"
        write_file(path, approval, private=True, overwrite=True)
        with self._lock:
            self._stored[project_id] = approval

    def _governance(self) -> GovernanceSettings:
        if self.governance is None:
            raise ConfigError("this node has no [governance] section: its projects are hand-kept")
        return self.governance

    def _dir(self, name: str) -> Path:
        return self.config.state_dir / name


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def scopes(projects: Projects, ids: tuple[str, ...]) -> Mapping[str, ProjectPolicy]:
    out = {}
    for pid in ids:
        try:
            out[pid] = projects.known(pid).policy
        except (QueryRefused, NotApproved):
            continue
    return out
