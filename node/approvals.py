"""Which projects this node serves, and within what scope: from signed approvals (governance),
or from the hand-kept ``[projects.*]`` of a development node.

With ``[governance]``, every request carries the project's approval bundle (the coordinator
sends it; nothing in it is trusted until checked). The node checks it against its own pinned
committee keys and policy, its own participation rules and the statements its trust imported
itself, then derives the project's scope and budget from the application.

Kept in the state directory (owner-only):

- ``approvals/<project>.json``: the newest version of the project's approval that held here
  (budget reports and ``fedtre node budget`` use it, checked again each time); a request that
  carries an older version of the application is refused as superseded;
- ``approvals/by-digest/<digest>.json``: every version that held, so that a commit is checked
  against the very approval its query was prepared under (its ledger entry names it);
- ``imported/``: committee revocations and the trust's own data guardian's participation
  statements, imported by the trust (``fedtre node approvals import``), each verified on import.
  They count from the next request of a running node, whatever the coordinator sends or omits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtre.dp import epsilon_to_units
from fedtre.errors import ConfigError, QueryRefused, Refusal
from fedtre.governance.bundle import Bundle
from fedtre.governance.documents import DocumentError, Kind, Signed, digest
from fedtre.governance.query_signature import verify as verify_query
from fedtre.governance.verify import Approved, NotApproved, check
from fedtre.pki import write_file
from fedtre.pki_requests import RevocationList
from fedtre.request import QueryRequest, check_ids
from node.config import GovernanceSettings, NodeConfig, ProjectPolicy

APPROVALS, BY_DIGEST, IMPORTED = "approvals", "by-digest", "imported"
UNKNOWN = "This trust has no approved project with that id."
MAX_VERDICTS = 256


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
        # project -> (file stamp, newest bundle that held, as stored)
        self._newest: dict[str, tuple[tuple[int, int, int], bytes]] = {}
        # (names in imported/, generation, statements): reloaded when the names change
        self._imported: tuple[tuple[str, ...], int, tuple[Signed, ...]] = ((), 0, ())
        # verdicts that held, by (bundle, imported generation): used until they could change
        self._verified: dict[tuple[bytes, int], tuple[Verified, dt.datetime]] = {}
        self._ca: bytes | None = None
        server = config.server
        # the federation's certificate revocation list: callers and researchers' signatures
        self.crl = (
            RevocationList(server.crl, server.ca)
            if server is not None and server.crl is not None and server.ca is not None
            else None
        )
        if self.governance is not None:
            for d in (self._dir(APPROVALS), self._dir(APPROVALS) / BY_DIGEST, self._dir(IMPORTED)):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- every request ---------------------------------------------------------------------

    def for_request(self, project_id: str, approval: bytes) -> Verified:
        """The project as approved now; refuses (data-free, plain words) otherwise."""
        check_ids("q", project_id)
        if self.governance is None:
            return Verified(self._configured(project_id), None)
        newest = self._newest_bundle(project_id)
        if not approval:
            if newest is None:
                raise QueryRefused(
                    Refusal.UNKNOWN_PROJECT,
                    "The request carries no approval, and this trust holds none for that project.",
                )
            approval = newest
        verified = self._verify(project_id, approval)
        assert verified.approved is not None
        if approval != newest:
            self._remember(project_id, approval, verified.approved)
        return verified

    def for_commit(self, project_id: str, approval_digest: str) -> Verified:
        """The approval a prepared query was prepared under, checked again now (a revocation
        since then stops the release). Hand-kept projects: the configured one."""
        check_ids("q", project_id)
        if self.governance is None or not approval_digest:
            if self.governance is not None:
                raise NotApproved("this query was prepared without a signed approval")
            return Verified(self._configured(project_id), None)
        path = self._dir(APPROVALS) / BY_DIGEST / f"{_safe_digest(approval_digest)}.json"
        try:
            bundle = path.read_bytes()
        except FileNotFoundError:
            raise NotApproved("the approval this query was prepared under is not held") from None
        return self._verify(project_id, bundle)

    def known(self, project_id: str) -> Verified:
        """A project this node has seen approved (budget reports, describe): checked again."""
        check_ids("q", project_id)
        if self.governance is None:
            return Verified(self._configured(project_id), None)
        stored = self._newest_bundle(project_id)
        if stored is None:
            raise QueryRefused(Refusal.UNKNOWN_PROJECT, UNKNOWN)
        return self._verify(project_id, stored)

    def check_signature(self, verified: Verified, request: QueryRequest) -> str:
        """Under a signed approval, the query must be signed by a researcher it names
        (``fedtre.governance.query_signature``); returns the researcher. Hand-kept: ""."""
        if verified.approved is None:
            return ""
        signer = verify_query(
            request.signed,
            ca_pem=self._ca_pem(),
            application=verified.approved.application,
            project_id=request.project_id,
            query_id=request.query_id,
            sql=request.sql,
            epsilon_units=epsilon_to_units(request.epsilon),
            now=self._now(),
            revoked=self.crl.problem if self.crl is not None else None,
        )
        if request.researcher and request.researcher != signer:
            # the audit names the researcher the coordinator gave: it must be the signer
            raise NotApproved("the query was signed by another researcher than the one named")
        return signer

    def held(self) -> Mapping[str, ProjectPolicy]:
        """The projects this node serves now, by id (hand-kept, or stored approvals that still
        hold, each checked once)."""
        if self.governance is None:
            return dict(sorted(self.config.projects.items()))
        out = {}
        for path in sorted(self._dir(APPROVALS).glob("*.json")):
            try:
                out[path.stem] = self.known(path.stem).policy
            except (QueryRefused, NotApproved):
                continue
        return out

    # -- the trust's own imports -----------------------------------------------------------

    def import_file(self, path: Path) -> str:
        """Import a committee revocation, this trust's data guardian's participation, or an
        approval bundle; each verified first. Returns what was imported, in words."""
        gov = self._governance()
        try:
            data = Path(path).read_bytes()
            doc: Any = json.loads(data.decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ConfigError(f"cannot read {path}: not a JSON document ({exc})") from None
        if isinstance(doc, dict) and doc.get("kind") == "fedtre.approval-bundle/1":
            try:
                app = Bundle.from_bytes(data).parsed()
            except DocumentError as exc:
                raise ConfigError(f"{path}: not a valid approval ({exc})") from None
            verified = self._verify(app.project_id, data)
            assert verified.approved is not None
            self._remember(app.project_id, data, verified.approved)
            return f"approval of {app.project_id} (checked: it holds at this trust)"
        try:
            signed = Signed.from_json(doc)
            statement = signed.statement()
        except DocumentError as exc:
            raise ConfigError(
                f"{path}: neither an approval, a revocation nor a participation ({exc})"
            ) from None
        if statement.kind is Kind.REVOCATION:
            member = gov.committee.by_key_id(signed.key_id)
            if member is None or not member.key.verify(signed.signature, signed.body):
                raise ConfigError(f"{path}: not signed by a member of this node's committee")
            what = f"revocation of {statement.project_id} by {member.name} ({member.role.value})"
        elif statement.kind is Kind.PARTICIPATION:
            guardian = next((k for k in gov.trust.guardians if k.key_id == signed.key_id), None)
            if guardian is None or not guardian.verify(signed.signature, signed.body):
                raise ConfigError(f"{path}: not signed by one of this trust's data guardians")
            if statement.trust != gov.trust.trust:
                raise ConfigError(f"{path}: speaks for another trust ({statement.trust})")
            choice = statement.participation.value if statement.participation else "?"
            what = f"data guardian's {choice} for {statement.project_id}"
        else:
            raise ConfigError(f"{path}: a committee decision travels in the approval, not alone")
        target = self._dir(IMPORTED) / f"{digest(signed.body)[:32]}.json"
        write_file(target, json.dumps(signed.to_json()).encode(), private=True, overwrite=True)
        _fsync_dir(target.parent)
        return f"{what}; effective from the next query"

    def imported(self) -> tuple[Signed, ...]:
        return self._imported_list()[1]

    # -- inside ------------------------------------------------------------------------------

    def _imported_list(self) -> tuple[int, tuple[Signed, ...]]:
        """(generation, statements): the generation changes whenever the list is reloaded.
        The directory is listed on every request (a rename within one clock tick is seen)."""
        directory = self._dir(IMPORTED)
        try:
            names = tuple(sorted(n for n in os.listdir(directory) if n.endswith(".json")))
        except OSError:
            raise QueryRefused(
                Refusal.NOT_AUTHORISED,
                "This trust cannot read its own list of imported revocations; it serves no "
                "project until its operators repair it.",
            ) from None
        with self._lock:
            if self._imported[0] == names:
                return self._imported[1], self._imported[2]
        loaded = []
        for name in names:
            try:
                text = (directory / name).read_text(encoding="utf-8")
                loaded.append(Signed.from_json(json.loads(text)))
            except (OSError, ValueError, DocumentError, RecursionError):
                # an unreadable revocation must not be ignored silently: refuse everything
                raise QueryRefused(
                    Refusal.NOT_AUTHORISED,
                    "This trust cannot read its own list of imported revocations; it serves "
                    "no project until its operators repair it.",
                ) from None
        with self._lock:
            generation = self._imported[1] + 1
            self._imported = (names, generation, tuple(loaded))
        return generation, tuple(loaded)

    def _verify(self, project_id: str, approval: bytes) -> Verified:
        """The approval checked now: signatures and policy (cached while they stand), and,
        every time, that no newer version of the project is held here."""
        generation, imported = self._imported_list()
        key = (approval, generation)
        now = self._now()
        with self._lock:
            cached = self._verified.get(key)
        if cached is not None and now < cached[1] and cached[0].policy.project_id == project_id:
            verified = cached[0]
        else:
            verified = self._verify_now(project_id, approval, imported, now)
            assert verified.approved is not None
            with self._lock:
                if len(self._verified) >= MAX_VERDICTS:
                    self._verified.clear()
                self._verified[key] = (verified, verified.approved.holds_until)
        assert verified.approved is not None
        self._not_superseded(project_id, approval, verified.approved)
        return verified

    def _not_superseded(self, project_id: str, approval: bytes, approved: Approved) -> None:
        newest = self._newest_bundle(project_id)
        if newest is None or newest == approval:
            return
        held = _parsed(newest)
        if held is not None and held.submitted_at > approved.application.submitted_at:
            raise NotApproved(
                "a newer version of this project's application is approved at this trust; "
                "the version sent is superseded"
            )

    def _verify_now(
        self, project_id: str, approval: bytes, imported: tuple[Signed, ...], now: dt.datetime
    ) -> Verified:
        gov = self._governance()
        try:
            bundle = Bundle.from_bytes(approval)
        except DocumentError as exc:
            raise NotApproved(f"the approval sent with the request is malformed: {exc}") from None
        approved = check(bundle, gov.committee, now, trust=gov.trust, imported=imported)
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
            purpose=app.purpose.value,
        )
        return Verified(policy, approved)

    def _remember(self, project_id: str, bundle: bytes, approved: Approved) -> None:
        """Keep a bundle that held: by its application's digest (commits), and as the newest
        version of the project unless a newer one is held already. Under a lock file shared
        with ``fedtre node approvals import`` (another process): compare, then replace."""
        by_digest = self._dir(APPROVALS) / BY_DIGEST / f"{approved.digest}.json"
        with _locked(self._dir(APPROVALS) / ".lock"):
            if not by_digest.exists():
                write_file(by_digest, bundle, private=True, overwrite=True)
            newest = self._newest_bundle(project_id)
            held = _parsed(newest) if newest is not None else None
            if held is not None and held.submitted_at > approved.application.submitted_at:
                return
            if newest == bundle:
                return
            path = self._dir(APPROVALS) / f"{project_id}.json"
            write_file(path, bundle, private=True, overwrite=True)

    def _ca_pem(self) -> bytes:
        server = self.config.server
        if server is None or server.ca is None:
            raise NotApproved(
                "this node has no federation CA configured ([server] ca), so it cannot check "
                "researchers' signatures"
            )
        if self._ca is None:
            try:
                self._ca = server.ca.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read the CA {server.ca}: {exc}") from None
        return self._ca

    def _configured(self, project_id: str) -> ProjectPolicy:
        project = self.config.projects.get(project_id)
        if project is None:
            raise QueryRefused(Refusal.UNKNOWN_PROJECT, UNKNOWN)
        return project

    def _newest_bundle(self, project_id: str) -> bytes | None:
        """The newest version held, as on disk now (one ``stat`` per call: another process,
        ``fedtre node approvals import``, may have replaced it)."""
        path = self._dir(APPROVALS) / f"{project_id}.json"  # project_id checked by callers
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        with self._lock:
            cached = self._newest.get(project_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        with self._lock:
            if len(self._newest) >= 10_000:
                self._newest.clear()
            self._newest[project_id] = (stamp, data)
        return data

    def _governance(self) -> GovernanceSettings:
        if self.governance is None:
            raise ConfigError("this node has no [governance] section: its projects are hand-kept")
        return self.governance

    def _dir(self, name: str) -> Path:
        return self.config.state_dir / name


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=64)
def _parsed(bundle: bytes) -> Any:
    try:
        return Bundle.from_bytes(bundle).parsed()
    except DocumentError:
        return None


def _safe_digest(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise NotApproved("the ledger names a malformed approval")
    return value


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
