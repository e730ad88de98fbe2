"""Signed approvals, checked as a node checks them: every row of THREATS.md "Governance and
identity" that is about approvals, at the level of the check itself (the node's use of it, with
nothing spent, is tested in tests/integration/test_governance_node.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import stat
import tomllib
from pathlib import Path
from types import MappingProxyType

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtre.catalog import Tier, load_catalog
from fedtre.errors import ConfigError, Refusal
from fedtre.governance import keys, statements
from fedtre.governance.bundle import Bundle
from fedtre.governance.documents import (
    Application,
    DocumentError,
    MemberRole,
    OrganisationType,
    Participation,
    Purpose,
    Signed,
    Verdict,
)
from fedtre.governance.form import application_from_form
from fedtre.governance.policy import ApprovalPolicy, Committee, Member, parse_committee
from fedtre.governance.verify import NotApproved, TrustPolicy, check

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def _key() -> keys.SigningKey:
    return keys.SigningKey(Ed25519PrivateKey.generate())


ANN, BOB, CAT, DEE = _key(), _key(), _key(), _key()  # service user, clinician, IG, service user
GUARDIAN_A, GUARDIAN_B, OUTSIDER = _key(), _key(), _key()
COMMITTEE = Committee(
    MappingProxyType(
        {
            "ann": Member("ann", MemberRole.SERVICE_USER, ANN.public),
            "bob": Member("bob", MemberRole.CLINICIAN, BOB.public),
            "cat": Member("cat", MemberRole.INFORMATION_GOVERNANCE, CAT.public),
            "dee": Member("dee", MemberRole.SERVICE_USER, DEE.public),
        }
    ),
    ApprovalPolicy(),
)
TRUST_A = TrustPolicy("trust-a", guardians=(GUARDIAN_A.public,))
TRUST_B = TrustPolicy("trust-b", guardians=(GUARDIAN_B.public,))


def _app(**changes: object) -> Application:
    base = Application(
        project_id="dep-prev",
        title="Depression prevalence",
        lay_summary="How common is depression in young people?",
        purpose=Purpose.PUBLIC_BENEFIT_RESEARCH,
        organisation="University of Leeds",
        organisation_type=OrganisationType.UNIVERSITY,
        researchers=("alice",),
        views=("patients", "conditions"),
        max_tier=Tier.MENTAL_HEALTH,
        trusts=("trust-a", "trust-b"),
        epsilon_per_trust=3.0,
        max_epsilon_per_query=1.0,
        default_epsilon=0.1,
        allow_partial=False,
        suppress_below=10,
        round_to=5,
        expires=dt.date(2027, 12, 31),
        submitted="2026-12-01T10:00:00Z",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _approve(app: bytes, *signers: keys.SigningKey, at: dt.datetime = NOW - DAY) -> list[Signed]:
    return [
        statements.decision(k, app, Verdict.APPROVE, "fine", at, dt.timedelta(days=90))
        for k in signers
    ]


def _guardian(app: bytes, key: keys.SigningKey, trust: str, choice=Participation.ACCEPT) -> Signed:
    return statements.participation(key, app, trust, choice, "", NOW - DAY)


def _bundle(app: Application | bytes, *signed: Signed) -> Bundle:
    data = app if isinstance(app, bytes) else app.to_bytes()
    return Bundle(data, tuple(signed))


def _approved_bundle(app: Application | None = None) -> Bundle:
    data = (app or _app()).to_bytes()
    return _bundle(data, *_approve(data, ANN, BOB), _guardian(data, GUARDIAN_A, "trust-a"))


def _refused(bundle: Bundle, trust: TrustPolicy | None = TRUST_A, **kw: object) -> str:
    with pytest.raises(NotApproved) as info:
        check(bundle, COMMITTEE, kw.pop("now", NOW), trust=trust, **kw)  # type: ignore[arg-type]
    assert info.value.refusal is Refusal.NOT_AUTHORISED
    return str(info.value)


# -- what holds -----------------------------------------------------------------------------


def test_two_approvals_with_a_service_user_and_the_guardian_s_signature_hold() -> None:
    approved = check(_approved_bundle(), COMMITTEE, NOW, trust=TRUST_A)
    assert [m.name for m in approved.approvers] == ["ann", "bob"]
    assert approved.participation == "signed by the data guardian"
    assert approved.valid_until == NOW - DAY + dt.timedelta(days=90)
    assert approved.application.project_id == "dep-prev"


def test_a_bundle_survives_its_wire_form_byte_for_byte() -> None:
    bundle = _approved_bundle()
    again = Bundle.from_bytes(bundle.to_bytes())
    assert again == bundle
    check(again, COMMITTEE, NOW, trust=TRUST_A)


def test_a_trust_may_take_part_by_its_own_policy_without_a_signature() -> None:
    data = _app().to_bytes()
    bundle = _bundle(data, *_approve(data, ANN, BOB))
    auto = dataclasses.replace(
        TRUST_A, accept_purposes=frozenset({Purpose.PUBLIC_BENEFIT_RESEARCH})
    )
    assert check(bundle, COMMITTEE, NOW, trust=auto).participation == "by the trust's policy"
    assert "has not signed its participation" in _refused(bundle)


# -- THREATS.md: forged, tampered, replayed, expired, revoked --------------------------------


def test_a_decision_signed_by_a_key_not_on_the_committee_is_refused() -> None:
    data = _app().to_bytes()
    bundle = _bundle(data, *_approve(data, ANN, OUTSIDER), _guardian(data, GUARDIAN_A, "trust-a"))
    assert "not on this node's committee list" in _refused(bundle)


def test_an_application_changed_after_signing_is_refused() -> None:
    signed_for = _app().to_bytes()
    approvals = _approve(signed_for, ANN, BOB)
    more_budget = _app(epsilon_per_trust=9.0).to_bytes()
    bundle = _bundle(more_budget, *approvals, _guardian(more_budget, GUARDIAN_A, "trust-a"))
    assert "another version of the application" in _refused(bundle)


def test_a_statement_changed_after_signing_is_refused() -> None:
    data = _app().to_bytes()
    honest = _approve(data, ANN)[0]
    body = json.loads(honest.body)
    body["valid_until"] = "2030-01-01T00:00:00Z"  # stretch the approval
    forged = Signed(json.dumps(body).encode(), honest.key_id, honest.signature)
    bundle = _bundle(data, forged, *_approve(data, BOB), _guardian(data, GUARDIAN_A, "trust-a"))
    assert "does not match its signature" in _refused(bundle)


def test_approvals_replayed_onto_another_project_are_refused() -> None:
    other = _app(project_id="other-project").to_bytes()
    approvals = _approve(other, ANN, BOB)
    data = _app().to_bytes()
    bundle = _bundle(data, *approvals, _guardian(data, GUARDIAN_A, "trust-a"))
    assert "another project" in _refused(bundle)


def test_a_participation_signed_for_another_trust_does_not_count_here() -> None:
    data = _app().to_bytes()
    bundle = _bundle(data, *_approve(data, ANN, BOB), _guardian(data, GUARDIAN_A, "trust-a"))
    check(bundle, COMMITTEE, NOW, trust=TRUST_A)
    assert "has not signed its participation" in _refused(bundle, TRUST_B)
    # nor does trust-a's guardian key sign for trust-b
    stolen = _bundle(data, *_approve(data, ANN, BOB), _guardian(data, GUARDIAN_A, "trust-b"))
    assert "does not name as a data guardian" in _refused(stolen, TRUST_B)


def test_a_trust_not_named_in_the_application_refuses() -> None:
    app = _app(trusts=("trust-b",))
    data = app.to_bytes()
    bundle = _bundle(data, *_approve(data, ANN, BOB), _guardian(data, GUARDIAN_A, "trust-a"))
    assert "not named in the project's application" in _refused(bundle)


def test_an_expired_application_is_refused() -> None:
    bundle = _approved_bundle(_app(expires=dt.date(2026, 12, 1)))
    assert "expired on 2026-12-01" in _refused(bundle)


def test_approvals_lapse_unless_renewed_and_cannot_outlive_the_policy() -> None:
    data = _app().to_bytes()
    old = _approve(data, ANN, BOB, at=NOW - dt.timedelta(days=91))
    bundle = _bundle(data, *old, _guardian(data, GUARDIAN_A, "trust-a"))
    assert "it has 0" in _refused(bundle)
    renewed = bundle.with_statement(_approve(data, ANN)[0]).with_statement(_approve(data, BOB)[0])
    check(renewed, COMMITTEE, NOW, trust=TRUST_A)
    too_long = [
        statements.decision(k, data, Verdict.APPROVE, "", NOW - DAY, dt.timedelta(days=400))
        for k in (ANN, BOB)
    ]
    bundle = _bundle(data, *too_long, _guardian(data, GUARDIAN_A, "trust-a"))
    assert "it has 0" in _refused(bundle)


def test_a_revoked_project_is_refused_also_when_the_coordinator_withholds_the_revocation() -> None:
    data = _app().to_bytes()
    revoked = statements.revocation(CAT, data, "consent concerns", NOW - dt.timedelta(hours=1))
    assert "revoked this project on 2026-12-02: consent concerns" in _refused(
        _approved_bundle().with_statement(revoked)
    )
    # the coordinator sends the bundle without it; the node imported it itself
    assert "revoked" in _refused(_approved_bundle(), imported=[revoked])
    # in a bundle, a revocation by someone off the committee is a forgery
    fake = statements.revocation(OUTSIDER, data, "", NOW)
    assert "not on this node's committee list" in _refused(_approved_bundle().with_statement(fake))
    # another project's revocation leaves this one alone
    other = statements.revocation(CAT, _app(project_id="other").to_bytes(), "", NOW)
    check(_approved_bundle(), COMMITTEE, NOW, trust=TRUST_A, imported=[other])


def test_a_revocation_revokes_every_version_submitted_before_it() -> None:
    v1 = _app()
    v2 = _app(epsilon_per_trust=2.0, submitted="2026-12-02T11:00:00Z")
    revoked = statements.revocation(CAT, v2.to_bytes(), "stop", NOW)  # signed against v2
    assert "revoked" in _refused(_approved_bundle(v1), imported=[revoked])
    assert "revoked" in _refused(_approved_bundle(v1).with_statement(revoked))
    # a version submitted after the revocation is a new application: it can be approved again
    v3 = _app(submitted="2026-12-02T13:00:00Z")
    later = NOW + dt.timedelta(hours=2)
    data = v3.to_bytes()
    bundle = _bundle(
        data, *_approve(data, ANN, BOB, at=later), _guardian(data, GUARDIAN_A, "trust-a")
    )
    check(bundle, COMMITTEE, later, trust=TRUST_A, imported=[revoked])


def test_a_guardian_s_withdrawal_imported_by_the_trust_counts_when_the_bundle_omits_it() -> None:
    data = _app().to_bytes()
    withdrawn = statements.participation(GUARDIAN_A, data, "trust-a", Participation.REFUSE, "", NOW)
    assert "declined" in _refused(_approved_bundle(), imported=[withdrawn])
    # dated a little ahead (the guardian's clock is fast): it counts at once all the same
    ahead = statements.participation(
        GUARDIAN_A, data, "trust-a", Participation.REFUSE, "", NOW + dt.timedelta(minutes=10)
    )
    assert "declined" in _refused(_approved_bundle().with_statement(ahead))


def test_a_verdict_is_not_kept_past_a_statement_that_starts_to_count_later() -> None:
    data = _app().to_bytes()
    # a member's rejection dated ahead withdraws their approval at once
    soon = statements.decision(BOB, data, Verdict.REJECT, "", NOW + dt.timedelta(hours=1), DAY)
    assert "it has 1" in _refused(_approved_bundle().with_statement(soon))
    # an approval dated ahead counts only from then: a verdict now is kept no longer than that
    ahead = _approve(data, CAT, at=NOW + dt.timedelta(hours=1))[0]
    approved = check(_approved_bundle().with_statement(ahead), COMMITTEE, NOW, trust=TRUST_A)
    assert approved.holds_until <= NOW + dt.timedelta(hours=1)


# -- THREATS.md: under-signed, missing service user -------------------------------------------


def test_one_approval_is_too_few() -> None:
    data = _app().to_bytes()
    bundle = _bundle(data, *_approve(data, ANN), _guardian(data, GUARDIAN_A, "trust-a"))
    assert "at least 2 committee members including 1 service user(s); it has 1" in _refused(bundle)


def test_approvals_without_a_service_user_are_refused() -> None:
    data = _app().to_bytes()
    bundle = _bundle(data, *_approve(data, BOB, CAT), _guardian(data, GUARDIAN_A, "trust-a"))
    assert "including 0 service user(s)" in _refused(bundle)


def test_the_highly_sensitive_tier_needs_two_service_users() -> None:
    data = _app(max_tier=Tier.HIGHLY_SENSITIVE).to_bytes()
    guardian = _guardian(data, GUARDIAN_A, "trust-a")
    bundle = _bundle(data, *_approve(data, ANN, BOB, CAT), guardian)
    assert "including 2 service user(s) (the highly sensitive tier" in _refused(bundle)
    check(_bundle(data, *_approve(data, ANN, DEE), guardian), COMMITTEE, NOW, trust=TRUST_A)


def test_a_member_s_later_rejection_withdraws_their_approval() -> None:
    data = _app().to_bytes()
    rejection = statements.decision(BOB, data, Verdict.REJECT, "changed my mind", NOW, DAY)
    assert "it has 1" in _refused(_approved_bundle().with_statement(rejection))


def test_signatures_twice_by_one_member_count_once() -> None:
    data = _app().to_bytes()
    twice = [*_approve(data, ANN), *_approve(data, ANN, at=NOW - 2 * DAY)]
    bundle = _bundle(data, *twice, _guardian(data, GUARDIAN_A, "trust-a"))
    assert "it has 1" in _refused(bundle)


# -- purposes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"max_tier": Tier.HIGHLY_SENSITIVE}, "may not read the highly_sensitive tier"),
        ({"max_epsilon_per_query": 0.5}, "may spend at most ε 0.25 per query"),
        ({"epsilon_per_trust": 5.0, "max_epsilon_per_query": 0.2}, "spend at most ε 2 per trust"),
        ({"max_epsilon_per_query": 0.2, "suppress_below": 10}, "must suppress counts below 20"),
    ],
)
def test_commercial_projects_meet_stricter_rules(changes: dict[str, object], says: str) -> None:
    base = {"purpose": Purpose.COMMERCIAL, "epsilon_per_trust": 2.0, "suppress_below": 20}
    app = _app(**{**base, **changes})
    data = app.to_bytes()
    signers = (ANN, DEE, BOB) if app.max_tier is Tier.HIGHLY_SENSITIVE else (ANN, BOB)
    bundle = _bundle(data, *_approve(data, *signers), _guardian(data, GUARDIAN_A, "trust-a"))
    refused = _refused(bundle)
    assert refused.startswith("commercial projects") and says in refused


def test_a_trust_can_refuse_a_purpose_outright() -> None:
    app = _app(
        purpose=Purpose.COMMERCIAL,
        epsilon_per_trust=2.0,
        max_epsilon_per_query=0.2,
        suppress_below=20,
    )
    bundle = _approved_bundle(app)
    check(bundle, COMMITTEE, NOW, trust=TRUST_A)
    no_commerce = dataclasses.replace(TRUST_A, refuse_purposes=frozenset({Purpose.COMMERCIAL}))
    assert "does not take part in commercial projects" in _refused(bundle, no_commerce)


def test_a_guardian_who_declines_is_heard() -> None:
    data = _app().to_bytes()
    no = _guardian(data, GUARDIAN_A, "trust-a", Participation.REFUSE)
    bundle = _bundle(data, *_approve(data, ANN, BOB), no)
    assert "declined to take part" in _refused(bundle)


# -- documents --------------------------------------------------------------------------------


def test_documents_with_unknown_or_missing_fields_are_refused() -> None:
    d = _app().to_json()
    with pytest.raises(DocumentError, match="unknown field"):
        Application.from_bytes(json.dumps({**d, "extra": 1}).encode())
    with pytest.raises(DocumentError, match="missing"):
        Application.from_bytes(json.dumps({k: v for k, v in d.items() if k != "trusts"}).encode())
    with pytest.raises(DocumentError):
        Bundle.from_bytes(b"\xff not json")
    assert "not valid" in _refused(Bundle(b'{"kind": "fedtre.application/1"}'))


def test_the_application_form_is_checked_against_the_catalog() -> None:
    form = {
        k: v
        for k, v in _app().to_json().items()
        if k not in {"kind", "submitted", "default_epsilon", "allow_partial"}
    }
    form["expires"] = dt.date(2027, 12, 31)
    app = application_from_form(form, load_catalog(), NOW, "form")
    assert app.submitted == "2026-12-02T12:00:00Z" and app.default_epsilon == 0.1
    with pytest.raises(ConfigError, match="not in the catalog: nope"):
        application_from_form({**form, "views": ["nope"]}, load_catalog(), NOW, "form")
    with pytest.raises(ConfigError, match="future date"):
        application_from_form({**form, "expires": dt.date(2026, 1, 1)}, load_catalog(), NOW, "f")
    with pytest.raises(ConfigError, match="unknown"):
        application_from_form({**form, "budget": 1}, load_catalog(), NOW, "form")


def test_committee_file_round_trip_and_refusals(tmp_path: Path) -> None:
    text = COMMITTEE.to_toml()
    again = parse_committee(tomllib.loads(text), "committee.toml")
    assert again.members == COMMITTEE.members
    assert again.policy.min_approvals == 2
    dup = tomllib.loads(text)
    dup["members"]["eve"] = dict(dup["members"]["ann"])
    with pytest.raises(ConfigError, match="same key"):
        parse_committee(dup, "c")
    bad = tomllib.loads(text)
    bad["policy"]["min_service_users"] = 5
    with pytest.raises(ConfigError, match="cannot exceed"):
        parse_committee(bad, "c")


def test_signing_keys_are_written_owner_only_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "ann.key"
    key = keys.generate(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.load(path).public == key.public
    assert keys.PublicKey.parse(keys.public_path(path).read_text().strip()) == key.public
    with pytest.raises(ConfigError, match="already exists"):
        keys.generate(path)


# -- queries signed by their researcher ---------------------------------------------------------


@pytest.fixture(scope="module")
def researchers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedtre import pki

    home = tmp_path_factory.mktemp("pki")
    pki.init_ca(home)
    pki.issue(home, pki.Role.RESEARCHER, "alice")
    pki.issue(home, pki.Role.NODE, "trust-a")
    pki.issue(
        home,
        pki.Role.RESEARCHER,
        "stale",
        not_before=dt.datetime.now(dt.UTC) - 10 * DAY,
        not_after=dt.datetime.now(dt.UTC) - DAY,
    )
    other = home / "other"
    pki.init_ca(other)
    pki.issue(other, pki.Role.RESEARCHER, "alice")
    return home


def _verify_query(home: Path, signed: object, **changes: object) -> str:
    from fedtre.governance.query_signature import verify

    request = {
        "project_id": "dep-prev",
        "query_id": "q-1",
        "sql": "SELECT COUNT(*) AS n FROM patients",
        "epsilon_units": 100_000,
        **changes,
    }
    return verify(
        signed,  # type: ignore[arg-type]
        ca_pem=(home / "ca.pem").read_bytes(),
        application=_app(researchers=("alice", "stale")),
        now=dt.datetime.now(dt.UTC),
        **request,  # type: ignore[arg-type]
    )


def _sign_as(home: Path, role: str, name: str, eps: float | None = 0.1) -> object:
    from fedtre.governance.query_signature import sign

    return sign(
        home / f"{role}-{name}.key",
        home / f"{role}-{name}.pem",
        "dep-prev",
        "q-1",
        "SELECT COUNT(*) AS n FROM patients",
        eps,
    )


def test_a_query_signed_by_a_named_researcher_holds(researchers: Path) -> None:
    assert _verify_query(researchers, _sign_as(researchers, "researcher", "alice")) == "alice"
    default = _sign_as(researchers, "researcher", "alice", eps=None)  # the project's default ε
    assert _verify_query(researchers, default, epsilon_units=_app().default_units) == "alice"


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("unsigned", "not signed by its researcher"),
        ("other sql", "differs from the query its researcher signed"),
        ("other id", "differs from the query its researcher signed"),
        ("more epsilon", "ε differs"),
        ("tampered statement", "does not match its researcher's signature"),
        ("another CA", "not signed by the federation CA"),
        ("expired certificate", "outside its validity period"),
        ("a node's certificate", "not a researcher's"),
    ],
)
def test_queries_not_signed_as_sent_are_refused(researchers: Path, how: str, says: str) -> None:
    import dataclasses as dc

    signed = _sign_as(researchers, "researcher", "alice")
    changes: dict[str, object] = {}
    if how == "unsigned":
        signed = None
    elif how == "other sql":
        changes["sql"] = "SELECT COUNT(*) AS n FROM conditions"
    elif how == "other id":
        changes["query_id"] = "q-2"
    elif how == "more epsilon":
        changes["epsilon_units"] = 900_000
    elif how == "tampered statement":
        body = signed.statement.replace(b"patients", b"visits")  # type: ignore[attr-defined]
        signed = dc.replace(signed, statement=body)  # type: ignore[type-var]
    elif how == "another CA":
        signed = _sign_as(researchers / "other", "researcher", "alice")
    elif how == "expired certificate":
        signed = _sign_as(researchers, "researcher", "stale")
    else:
        signed = _sign_as(researchers, "node", "trust-a")
    with pytest.raises(NotApproved) as info:
        _verify_query(researchers, signed, **changes)
    assert says in str(info.value)


def test_malformed_documents_are_refused_without_echoing_them() -> None:
    d = _app().to_json()
    with pytest.raises(DocumentError) as info:
        Application.from_bytes(json.dumps({**d, "\x1b[2J" + "x" * 1000: 1}).encode())
    assert "\x1b" not in str(info.value) and len(str(info.value)) < 200
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(DocumentError):
        Bundle.from_bytes(deep[:40_000])
    with pytest.raises(DocumentError, match="invisible"):
        Application.from_bytes(json.dumps({**d, "title": "ok\nstatus: approved"}).encode())


def test_the_registry_bundle_keeps_each_signer_s_latest_word(tmp_path: Path) -> None:
    from fedtre.governance.registry import Registry

    registry = Registry(tmp_path)
    data = registry.submit(_app())
    for day in range(40):  # forty renewals by two members
        for key in (ANN, BOB):
            registry.add("dep-prev", _approve(data, key, at=NOW - dt.timedelta(days=40 - day))[0])
    bundle = registry.bundle("dep-prev")
    assert len(bundle.statements) == 2
    check(
        bundle,
        COMMITTEE,
        NOW,
        trust=dataclasses.replace(
            TRUST_A, accept_purposes=frozenset({Purpose.PUBLIC_BENEFIT_RESEARCH})
        ),
    )


def test_show_marks_every_line_of_the_lay_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtre.cli import main
    from fedtre.governance.registry import Registry

    Registry(tmp_path).submit(_app(lay_summary="Why it matters.\nstatus: approved"))
    assert main(["project", "show", "--registry", str(tmp_path), "dep-prev"]) == 0
    out = capsys.readouterr().out
    assert "  | status: approved" in out
    assert not any(line.startswith("  status:") for line in out.splitlines())
