"""Keeping other services' signed audit checkpoints: each service witnesses the others.

The coordinator keeps every trust's checkpoint (from each Describe) and sends its own, and the
last it holds of every trust, with each Describe; every trust keeps them in its own log. A
service that later rewrites, truncates or replaces its log is then contradicted by checkpoints
held in logs it does not control. Each checkpoint's signature is checked; the first key seen for
a service is the one expected afterwards (a change of key or log id is reported, as is a log
that shrank or changed at the same size). Proving that a prefix was rewritten needs the log
itself: ``fedtre audit verify LOG --checkpoint ...`` with checkpoints exported from here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from fedtre.audit.checkpoint import Checkpoint, CheckpointError
from fedtre.audit.events import Event
from fedtre.audit.log import AuditLog, entries

MAX_SHARED = 64  # checkpoints sent with one Describe


@dataclass(frozen=True)
class Seen:
    actor: str
    problem: str  # "" when the checkpoint is consistent with what was kept before


class Witness:
    def __init__(
        self,
        log: AuditLog,
        record_every: float = 0.0,
        judge: bool = True,
        max_actors: int = 256,
    ) -> None:
        """``record_every``: seconds between recorded checkpoints of one service. ``judge``:
        compare each checkpoint with the last kept of its service and report regressions (the
        coordinator, which knows which trust sent each one). A trust cannot tell another
        trust's key from one a coordinator made up, so it only keeps what it is sent (signed,
        newer than what it holds, at most ``max_actors`` services): evidence for auditors."""
        self.log = log
        self.record_every = record_every
        self.judge = judge
        self.max_actors = max_actors
        self._kept: dict[str, Checkpoint] | None = None  # read from the log when first needed
        self._recorded: dict[str, float] = {}

    @property
    def kept(self) -> dict[str, Checkpoint]:
        """The last good checkpoint of each service (a command-line tool's engine, which is
        never described, never reads the log for them)."""
        if self._kept is None:
            self._kept = _kept(self.log.path)
        return self._kept

    def see(self, text: str, expected_actor: str | None = None) -> Seen:
        """Check one checkpoint, keep it, and record it (``checkpoint.witnessed``)."""
        problem, actor = "", expected_actor or ""
        try:
            cp = Checkpoint.from_json(text)
            cp.check()
        except CheckpointError as exc:
            if not self.judge:
                return Seen(actor, "")  # nothing to keep
            problem = f"the checkpoint does not verify: {exc}"
        else:
            if not self.judge:
                return self._keep(cp, text)
            actor = actor or cp.actor
            if cp.actor != actor:
                problem = f"the checkpoint is of another actor's log ({cp.actor[:64]})"
            elif actor in self.kept:
                problem = regression(self.kept[actor], cp)
            if not problem:
                self.kept[actor] = cp
        now = time.monotonic()
        last = self._recorded.get(actor)
        if not problem and last is not None and now - last < self.record_every:
            return Seen(actor, problem)
        self._recorded[actor] = now
        self.log.note(
            Event.CHECKPOINT_WITNESSED,
            trust=actor[:64],
            checkpoint=text[:4096],
            problem=problem or None,
        )
        return Seen(actor, problem)

    def _keep(self, cp: Checkpoint, text: str) -> Seen:
        """Keep (and, once per ``record_every``, record) a signed checkpoint, unjudged."""
        before = self.kept.get(cp.actor)
        if before is not None and (cp.time, cp.size) <= (before.time, before.size):
            return Seen(cp.actor, "")  # not newer than what is held
        if before is None and len(self.kept) >= self.max_actors:
            return Seen(cp.actor, "")
        self.kept[cp.actor] = cp
        now = time.monotonic()
        last = self._recorded.get(cp.actor)
        if last is None or now - last >= self.record_every:
            self._recorded[cp.actor] = now
            self.log.note(Event.CHECKPOINT_WITNESSED, trust=cp.actor[:64], checkpoint=text[:4096])
        return Seen(cp.actor, "")

    def shared(self, own: str, exclude: str = "") -> tuple[str, ...]:
        """What to send with a Describe: this service's own checkpoint and the newest kept of
        each other service (but ``exclude``, the receiver)."""
        others = [c for a, c in self.kept.items() if a != exclude]
        newest = sorted(others, key=lambda c: c.time, reverse=True)
        return (own, *(c.to_json() for c in newest[: MAX_SHARED - 1]))


def regression(before: Checkpoint, now: Checkpoint) -> str:
    if now.log_id != before.log_id or now.public_key != before.public_key:
        return "the log was replaced (another log id or key than before)"
    if now.size < before.size:
        return f"the log shrank from {before.size} to {now.size} entries"
    if now.size == before.size and now.head != before.head:
        return "the log was rewritten (same size, another head)"
    return ""


def _kept(path: Path) -> dict[str, Checkpoint]:
    """The last good checkpoint kept of each service, from this service's own log."""
    kept: dict[str, Checkpoint] = {}
    for e in entries(path, (Event.CHECKPOINT_WITNESSED,)):
        if e.get("problem"):
            continue
        with contextlib.suppress(CheckpointError):
            cp = Checkpoint.from_json(str(e.get("checkpoint", "")))
            kept[str(e.get("trust") or cp.actor)] = cp
    return kept
