"""Witnessing: a service keeps others' signed checkpoints and reports a log that was replaced,
shrank or was rewritten at the same size; forged checkpoints are reported, never kept."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtre.audit.checkpoint import Checkpoint, public_hex, sign_checkpoint
from fedtre.audit.events import Event
from fedtre.audit.log import AuditLog, read_audit
from fedtre.audit.witness import Witness


def _trust(path: Path, key: Ed25519PrivateKey, entries: int) -> str:
    log = AuditLog(path, "trust-a", public_key=public_hex(key))
    for _ in range(entries):
        log.note(Event.BUDGET_REQUESTED, project="p")
    text = sign_checkpoint(log, key).to_json()
    log.close()
    return text


def test_regressions_are_reported_and_recorded(tmp_path: Path) -> None:
    hub = AuditLog(tmp_path / "hub.sqlite", "hub", role="coordinator")
    witness = Witness(hub)
    key = Ed25519PrivateKey.generate()
    first = _trust(tmp_path / "a.sqlite", key, 5)
    assert witness.see(first, "trust-a").problem == ""
    grown = _trust(tmp_path / "a.sqlite", key, 3)
    assert witness.see(grown, "trust-a").problem == ""  # it grew
    # a new log (new id and key) in its place
    other = _trust(tmp_path / "b.sqlite", Ed25519PrivateKey.generate(), 20)
    assert "replaced" in witness.see(other, "trust-a").problem
    # a forged checkpoint claiming a shorter log of the same id
    forged = dataclasses.replace(Checkpoint.from_json(first), size=1)
    assert "does not verify" in witness.see(forged.to_json(), "trust-a").problem
    # the checkpoint of another service, sent as trust-a's
    assert "another actor" in witness.see(first, "trust-b").problem
    hub.close()
    recorded = [
        e for e in read_audit(tmp_path / "hub.sqlite") if e["event"] == "checkpoint.witnessed"
    ]
    assert [bool(e["problem"]) for e in recorded] == [False, False, True, True, True]
    # a restarted coordinator remembers the last good checkpoint of each trust
    again = Witness(AuditLog(tmp_path / "hub.sqlite", "hub", role="coordinator"))
    assert again.kept["trust-a"] == Checkpoint.from_json(grown)
