"""What the public register shows comes only from what verifies: signed decisions checked
against the committee's keys (each member's latest), logs that verify, valid trust names."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pytest

from fedtre.audit.events import Event
from fedtre.audit.log import AuditLog
from fedtre.governance import statements
from fedtre.governance.documents import Signed, Verdict
from fedtre.governance.local import LocalGovernance, application
from fedtre.governance.policy import load_committee
from fedtre.transparency.model import build
from fedtre.transparency.render import write_site


@pytest.fixture
def gov(tmp_path: Path) -> LocalGovernance:
    return LocalGovernance(tmp_path / "gov").create()


def _app(project: str):  # type: ignore[no-untyped-def]
    return application(
        project,
        researchers=("alice",),
        trusts=("trust-a",),
        views=("patients",),
        max_tier="mental_health",
        epsilon_per_trust=1000.0,
        max_epsilon_per_query=1.0,
        default_epsilon=0.1,
        allow_partial=False,
        suppress_below=0,
        round_to=1,
    )


def _decision(gov: LocalGovernance, data: bytes, verdict: Verdict) -> Signed:
    """Ann's (a service user's) decision on the application ``data``, signed now."""
    return statements.decision(
        gov.key("ann"), data, verdict, "decided", dt.datetime.now(dt.UTC), dt.timedelta(days=30)
    )


def _project(gov: LocalGovernance, **kw):  # type: ignore[no-untyped-def]
    site = build(gov.registry, load_committee(gov.committee_path), **kw)
    return site, {p.project_id: p for p in site.projects}


def test_a_forged_decision_is_not_shown(gov: LocalGovernance) -> None:
    data = gov.registry.submit(_app("p1"))
    real = _decision(gov, data, Verdict.APPROVE)
    forged = Signed(real.body, real.key_id, b"\0" * 64)  # ann's key id, no valid signature
    gov.registry.add("p1", forged)
    _, projects = _project(gov)
    assert projects["p1"].approvals == ()
    assert projects["p1"].service_user_signoff is False
    assert projects["p1"].status == "awaiting approval"


def test_sign_off_is_shown_only_for_an_approved_project_and_each_member_once(
    gov: LocalGovernance,
) -> None:
    gov.approve(_app("p2"))
    data = gov.registry.application("p2")
    for _ in range(3):  # renewals: the latest of each member counts
        gov.registry.add("p2", _decision(gov, data, Verdict.APPROVE))
    _, projects = _project(gov)
    assert sorted(a.role for a in projects["p2"].approvals) == ["clinician", "service-user"]
    assert projects["p2"].service_user_signoff and projects["p2"].status == "approved"
    gov.registry.add("p2", _decision(gov, data, Verdict.REJECT))
    _, projects = _project(gov)
    assert projects["p2"].status != "approved" and projects["p2"].service_user_signoff is False


def test_logs_that_do_not_verify_and_bad_names_are_left_out(
    gov: LocalGovernance, tmp_path: Path
) -> None:
    gov.approve(_app("p3"))
    good = AuditLog(tmp_path / "a.sqlite", "trust-a")
    con = good._con()
    con.execute("BEGIN IMMEDIATE")
    good.append(con, Event.QUERY_RELEASED, project="p3", query_id="q", epsilon_units=250_000)
    con.execute("COMMIT")
    good.close()
    evil = AuditLog(tmp_path / "evil.sqlite", "../../../pwned")
    con = evil._con()
    con.execute("BEGIN IMMEDIATE")
    evil.append(con, Event.QUERY_RELEASED, project="p3", query_id="q", epsilon_units=1)
    con.execute("COMMIT")
    evil.close()
    bad = AuditLog(tmp_path / "bad.sqlite", "trust-b")
    bad.note(Event.QUERY_RELEASED, project="p3", query_id="q2", epsilon_units=9_000_000)
    bad.close()
    raw = sqlite3.connect(tmp_path / "bad.sqlite")
    raw.execute("DROP TRIGGER audit_log_no_update")
    raw.execute("UPDATE audit_log SET entry = replace(entry, '9000000', '9000001')")
    raw.commit()
    raw.close()
    (gov.registry.root / "p3" / "statements" / "zz-bad.json").write_text("{not json")
    site, projects = _project(
        gov, trust_logs=[tmp_path / "a.sqlite", tmp_path / "evil.sqlite", tmp_path / "bad.sqlite"]
    )
    assert "p3" not in projects  # its statements cannot be read: left out, the rest built
    assert any("project p3" in x for x in site.left_out)
    assert any("bad.sqlite" in x for x in site.left_out)
    assert any("pwned" in x for x in site.left_out)
    out = tmp_path / "site"
    files = write_site(site, out)
    assert all(out.resolve() in f.resolve().parents for f in files)
    assert {t.trust for t in site.trusts} == {"trust-a"}
