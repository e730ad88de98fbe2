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


def test_a_trust_keeps_what_it_is_sent_without_judging_and_cannot_be_flooded(
    tmp_path: Path,
) -> None:
    """A trust cannot tell another trust's real key from one a coordinator made up: it keeps
    signed checkpoints as evidence (newer ones only, a bounded number of services, one a
    service an hour in its log) and reports nothing a coordinator could fake."""
    log = AuditLog(tmp_path / "trust.sqlite", "trust-b")
    witness = Witness(log, record_every=3600.0, judge=False, max_actors=3)
    key = Ed25519PrivateKey.generate()
    old = _trust(tmp_path / "a.sqlite", key, 2)
    new = _trust(tmp_path / "a.sqlite", key, 2)
    assert witness.see(new).problem == "" and witness.see(old).problem == ""
    assert witness.kept["trust-a"] == Checkpoint.from_json(new)  # the older one is ignored
    forged = dataclasses.replace(Checkpoint.from_json(new), size=1).to_json()
    assert witness.see(forged).problem == ""  # a bad signature: nothing kept, nothing said
    for i in range(10):  # many services
        k = Ed25519PrivateKey.generate()
        other = AuditLog(tmp_path / f"o{i}.sqlite", f"trust-x{i}", public_key=public_hex(k))
        witness.see(sign_checkpoint(other, k).to_json())
        other.close()
    assert len(witness.kept) == 3
    log.close()
    recorded = [e for e in read_audit(tmp_path / "trust.sqlite") if e["event"] != "log.created"]
    assert len(recorded) == 3 and not any(e.get("problem") for e in recorded)
