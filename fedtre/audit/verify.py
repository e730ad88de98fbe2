"""Verify an audit log: every link recomputed, and every checkpoint given matched.

Without a checkpoint, verification finds any entry changed, removed, inserted or reordered by
someone who did not also recompute the links after it. With an earlier checkpoint (held by an
auditor, another trust or the coordinator) it also finds a truncation and a wholesale rewrite
with a new, internally valid chain: the first ``size`` entries must hash to the checkpoint's
head, and the log must be the one the checkpoint names, under the key it was signed with.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedtre.audit.checkpoint import Checkpoint, CheckpointError
from fedtre.audit.events import Event
from fedtre.audit.log import genesis, schema_problem


@dataclass(frozen=True)
class Problem:
    seq: int | None  # the first bad entry, where one can be named
    what: str


@dataclass(frozen=True)
class Verification:
    path: str
    log_id: str
    actor: str
    size: int
    head: str
    checkpoints: int  # how many checkpoints were matched
    problems: tuple[Problem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "ok": self.ok,
            "log_id": self.log_id,
            "actor": self.actor,
            "size": self.size,
            "head": self.head,
            "checkpoints_matched": self.checkpoints,
            "problems": [{"seq": p.seq, "what": p.what} for p in self.problems],
        }


def verify(
    path: Path, checkpoints: Sequence[Checkpoint] = (), pinned_key: str | None = None
) -> Verification:
    """Check the log at ``path`` (read-only) against its own links and ``checkpoints``."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    except sqlite3.Error as exc:
        return _broken(path, f"cannot open the log: {exc}")
    try:
        return _verify(con, path, checkpoints, pinned_key)
    except sqlite3.Error as exc:
        return _broken(path, f"cannot read the log: {exc}")
    except Exception as exc:  # a malformed file is reported, never a crash
        return _broken(path, f"the log is malformed ({type(exc).__name__})")
    finally:
        con.close()


def _verify(
    con: sqlite3.Connection,
    path: Path,
    checkpoints: Sequence[Checkpoint],
    pinned_key: str | None,
) -> Verification:
    problems: list[Problem] = []
    row = con.execute("SELECT value FROM audit_meta WHERE key = 'log_id'").fetchone()
    if row is None or not isinstance(row[0], str):
        return _broken(path, "the log has no id (not a fedtre audit log, or its header was lost)")
    log_id = row[0]
    altered = schema_problem(con)
    if altered:
        problems.append(Problem(None, altered))
    wanted = {c.size for c in checkpoints}
    at: dict[int, bytes] = {}
    previous = start = genesis(log_id)
    if 0 in wanted:
        at[0] = start
    expected = 1
    first: dict[str, object] | None = None
    sha256 = hashlib.sha256
    for seq, entry, stored in con.execute("SELECT seq, entry, link FROM audit_log ORDER BY seq"):
        if type(seq) is not int or not isinstance(entry, str) or not isinstance(stored, bytes):
            problems.append(
                Problem(expected, f"entry {expected} is not stored as an entry (wrong types)")
            )
            break
        if seq != expected:
            problems.append(
                Problem(
                    expected,
                    f"entry {expected} is missing (the next entry is numbered {seq}): "
                    "entries were deleted or renumbered",
                )
            )
            expected = seq  # carry on from here, so later problems are found too
        computed = sha256(previous + seq.to_bytes(8, "big") + entry.encode()).digest()
        if computed != stored and (not problems or problems[-1].seq != seq):
            problems.append(
                Problem(
                    seq,
                    f"entry {seq} does not match its link: it, or an entry before it, was "
                    "modified, inserted, deleted or moved",
                )
            )
        if seq == 1:
            try:
                parsed = json.loads(entry)
            except ValueError:
                parsed = None
            first = parsed if isinstance(parsed, dict) else {}
        if seq in wanted:
            at[seq] = computed
        previous = computed
        expected += 1
    size = expected - 1
    actor = ""
    log_key = ""
    if first is None:
        if size == 0 and not checkpoints:
            problems.append(Problem(None, "the log is empty (its first entry was lost)"))
    elif first.get("event") != Event.LOG_CREATED.value or first.get("log_id") != log_id:
        problems.append(Problem(1, "the first entry is not this log's creation"))
    else:
        actor = str(first.get("node") or first.get("coordinator") or first.get("registry") or "")
        log_key = str(first.get("public_key") or "")
    if pinned_key is not None and (not log_key or log_key.lower() != pinned_key.lower()):
        problems.append(
            Problem(1, "the log names another checkpoint key than the one pinned: replaced")
        )
    problems += _releases_without_entries(con)
    matched = 0
    for cp in sorted(checkpoints, key=lambda c: c.size):
        problem = _match(cp, log_id, log_key, size, at.get(cp.size), pinned_key)
        if problem is None:
            matched += 1
        else:
            problems.append(problem)
    return Verification(
        str(path),
        log_id,
        actor,
        size,
        previous.hex() if size else start.hex(),
        matched,
        tuple(problems),
    )


def _match(
    cp: Checkpoint,
    log_id: str,
    log_key: str,
    size: int,
    computed: bytes | None,
    pinned_key: str | None,
) -> Problem | None:
    name = f"the checkpoint of {cp.time} ({cp.size} entries)"
    try:
        cp.check(pinned_key)
    except CheckpointError as exc:
        return Problem(None, f"{name} is not valid: {exc}")
    if cp.log_id != log_id:
        return Problem(
            None,
            f"{name} is of log {cp.log_id}, this log is {log_id}: the log was replaced or "
            "rewritten from the start",
        )
    if cp.public_key.lower() != log_key.lower():
        return Problem(1, f"{name} was signed with another key than this log names: rewritten")
    if cp.size > size:
        return Problem(
            size + 1,
            f"the log has {size} entries but {name} saw {cp.size}: it was truncated",
        )
    if computed is None or computed.hex() != cp.head.lower():
        return Problem(
            None,
            f"the first {cp.size} entries do not hash to {name}'s head: entries up to "
            f"{cp.size} were changed since (rewritten with a new chain, or edited)",
        )
    return None


# A ledger's releases since its audit log began (an upgraded trust's earlier ones were never
# in it): the rows every check of a ledger against its log reads.
COMMITTED_SINCE_LOG = (
    "state = 'committed' AND substr(decided_at, 1, 19) >= "
    "(SELECT substr(json_extract(entry, '$.ts'), 1, 19) FROM audit_log WHERE seq = 1)"
)


def has_ledger(con: sqlite3.Connection) -> bool:
    """The database holds a trust's ledger beside its log (a coordinator's does not)."""
    return (
        con.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'queries'"
        ).fetchone()
        is not None
    )


def _releases_without_entries(con: sqlite3.Connection) -> list[Problem]:
    """A trust's log shares its database with the ledger: every release committed since the
    log began must have its ``query.released`` entry (they commit in one transaction)."""
    if not has_ledger(con):
        return []
    missing = con.execute(
        "SELECT count(*), min(p || '/' || q) FROM ("
        f"SELECT project_id AS p, query_id AS q FROM queries WHERE {COMMITTED_SINCE_LOG} "
        "EXCEPT "
        "SELECT json_extract(entry, '$.project'), json_extract(entry, '$.query_id') "
        'FROM audit_log WHERE entry LIKE \'%"event":"query.released"%\' '
        "AND json_extract(entry, '$.event') = 'query.released')"
    ).fetchone()
    if not missing or not missing[0]:
        return []
    return [
        Problem(
            None,
            f"{missing[0]} release(s) in the ledger have no audit entry (first: {missing[1]})",
        )
    ]


def _broken(path: Path, what: str) -> Verification:
    return Verification(str(path), "", "", 0, "", 0, (Problem(None, what),))
