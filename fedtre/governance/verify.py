"""Is this project approved, here and now? The check every node makes on every request.

Nothing in the bundle is trusted because of who sent it: only signatures by keys the node
pinned (the committee's, in its copy of ``committee.toml``; its own data guardians', in its
config), the approval policy in that same file, the node's own purpose rules, and the node's
clock. The coordinator, or anyone holding its certificate, can send any bytes it likes; it cannot
sign for the committee or for the trust.

Refusals say, in plain words, which rule was not met. They never echo the document.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from fedtre.errors import Refusal, UserError
from fedtre.governance.bundle import Bundle
from fedtre.governance.documents import (
    Application,
    DocumentError,
    Kind,
    MemberRole,
    Participation,
    Purpose,
    Signed,
    Statement,
    Verdict,
)
from fedtre.governance.keys import PublicKey
from fedtre.governance.policy import Committee, Member

# A statement signed a little in the future (a signer's clock ahead of ours) still counts.
CLOCK_SKEW = dt.timedelta(minutes=5)


class NotApproved(UserError):
    """The project's approval does not hold at this node (signatures, policy, scope, time)."""

    def __init__(self, message: str) -> None:
        super().__init__(Refusal.NOT_AUTHORISED, message)


@dataclass(frozen=True)
class TrustPolicy:
    """A trust's own say: who signs its participation, and purposes it decides by rule."""

    trust: str
    guardians: tuple[PublicKey, ...] = ()
    accept_purposes: frozenset[Purpose] = frozenset()  # take part without a guardian signature
    refuse_purposes: frozenset[Purpose] = frozenset()  # never, whatever is signed


@dataclass(frozen=True)
class Approved:
    application: Application
    digest: str
    approvers: tuple[Member, ...]
    valid_until: dt.datetime  # when the policy stops being met unless decisions are renewed
    # "signed by the data guardian", "by the trust's policy", or "" (the coordinator's check)
    participation: str
    # the earliest time a statement already in hand starts to count (signed slightly in the
    # future by a clock ahead of ours): the verdict may change then
    next_change: dt.datetime | None = None

    @property
    def holds_until(self) -> dt.datetime:
        """Until when this verdict stands on the same documents (approvals lapse, the
        application expires at the end of its day, a statement starts to count): a cache of it
        may be used until then."""
        expiry = dt.datetime.combine(
            self.application.expires + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC
        )
        times = [self.valid_until, expiry]
        if self.next_change is not None:
            times.append(self.next_change)
        return min(times)


def check(
    bundle: Bundle,
    committee: Committee,
    now: dt.datetime,
    *,
    trust: TrustPolicy | None = None,
    imported: Iterable[Signed] = (),
) -> Approved:
    """The approval, verified; ``NotApproved`` saying why not.

    ``trust=None``: the checks that do not depend on a trust (the coordinator's own, before it
    fans out). ``imported``: statements the trust imported itself (revocations, its data
    guardian's participation), verified when imported; they count whatever the bundle omits.

    A revocation revokes its project: every version of the application submitted before it.
    A data guardian's latest word counts from the moment it is signed.
    """
    try:
        app = bundle.parsed()
    except DocumentError as exc:
        raise NotApproved(f"the project's application is not valid: {exc}") from None
    app_digest = bundle.digest
    decisions: dict[str, tuple[Statement, Member]] = {}
    participations: list[Statement] = []
    future: list[dt.datetime] = []
    guardians = {k.key_id: k for k in (trust.guardians if trust else ())}
    for signed in bundle.statements:
        statement = _statement(signed)
        if statement.signed_at - CLOCK_SKEW > now:
            future.append(statement.signed_at - CLOCK_SKEW)
        if statement.kind is Kind.PARTICIPATION:
            if trust is None or statement.trust != trust.trust:
                continue  # another trust's say: not ours to check
            key = guardians.get(signed.key_id)
            if key is None:
                raise NotApproved(
                    "the trust's participation is signed by a key this trust's policy does not "
                    "name as a data guardian"
                )
            _verify(key, signed, "the trust's participation")
            _same_application(statement, app, app_digest)
            participations.append(statement)
            continue
        member = committee.by_key_id(signed.key_id)
        if member is None:
            raise NotApproved(
                "the approval carries a signature by a key that is not on this node's "
                "committee list"
            )
        _verify(member.key, signed, "a committee member's statement")
        if statement.kind is Kind.REVOCATION:
            _revoked(statement, app, app_digest)
            continue  # another project's, or one before this version was submitted
        _same_application(statement, app, app_digest)
        latest = decisions.get(member.name)
        if latest is None or statement.signed_at >= latest[0].signed_at:
            decisions[member.name] = (statement, member)
    for signed in imported:
        said = _imported(signed)
        if said is None or said.project_id != app.project_id:
            continue
        if said.kind is Kind.REVOCATION:
            _revoked(said, app, app_digest)  # checked at import; honoured if its signer left
        elif (
            said.kind is Kind.PARTICIPATION
            and trust is not None
            and said.trust == trust.trust
            and said.application == app_digest
            and signed.key_id in guardians
        ):
            participations.append(said)
    if app.expired(now):
        raise NotApproved(f"the project's approval expired on {app.expires:%Y-%m-%d}")
    if app.submitted_at > now + CLOCK_SKEW:
        raise NotApproved("the project's application is dated in the future")
    approvers, valid_until = _approvers(decisions.values(), committee, now, app.submitted_at)
    _meets_policy(app, approvers, committee)
    _within_purpose_rules(app, committee)
    participation = "" if trust is None else _participation(app, trust, participations)
    return Approved(
        app, app_digest, approvers, valid_until, participation, min(future, default=None)
    )


def _revoked(statement: Statement, app: Application, app_digest: str) -> None:
    """A revocation revokes the version it names and every version submitted before it."""
    if statement.project_id != app.project_id:
        return
    if statement.application == app_digest or app.submitted_at <= statement.signed_at:
        raise NotApproved(
            f"the committee revoked this project on {statement.signed_at:%Y-%m-%d}"
            + (f": {_plain(statement.reason)}" if statement.reason else "")
        )


def _imported(signed: Signed) -> Statement | None:
    try:
        return signed.statement()
    except DocumentError:
        return None


def _plain(text: str, limit: int = 200) -> str:
    """Signed free text, as one short printable line (it goes into replies and audit lines)."""
    flat = "".join(c if c.isprintable() else " " for c in text)
    return flat[:limit] + ("…" if len(flat) > limit else "")


_GOOD_SIGNATURES: dict[bytes, bool] = {}
_GOOD_LOCK = threading.Lock()


def _signature_ok(raw_key: bytes, signature: bytes, body: bytes) -> bool:
    """Checked signatures that held, remembered by a digest (failures are not remembered)."""
    key = hashlib.sha256(raw_key + signature + body).digest()
    with _GOOD_LOCK:
        if key in _GOOD_SIGNATURES:
            return True
    if not PublicKey(raw_key).verify(signature, body):
        return False
    with _GOOD_LOCK:
        if len(_GOOD_SIGNATURES) >= 4096:
            _GOOD_SIGNATURES.clear()
        _GOOD_SIGNATURES[key] = True
    return True


def _verify(key: PublicKey, signed: Signed, what: str) -> None:
    if not _signature_ok(key.raw, signed.signature, signed.body):
        raise NotApproved(f"{what} does not match its signature (altered after signing)")


def _statement(signed: Signed) -> Statement:
    try:
        return signed.statement()
    except DocumentError as exc:
        raise NotApproved(f"the approval carries a malformed statement: {exc}") from None


def _same_application(statement: Statement, app: Application, app_digest: str) -> None:
    if statement.project_id != app.project_id:
        raise NotApproved("the approval carries a statement made for another project")
    if statement.application != app_digest:
        raise NotApproved(
            "the approval carries a statement made for another version of the application "
            "(changed after signing?)"
        )


def _approvers(
    latest: Iterable[tuple[Statement, Member]],
    committee: Committee,
    now: dt.datetime,
    submitted: dt.datetime,
) -> tuple[tuple[Member, ...], dt.datetime]:
    lifetime = dt.timedelta(days=committee.policy.max_approval_days)
    counted: list[tuple[Member, dt.datetime]] = []
    for statement, member in latest:
        if statement.verdict is not Verdict.APPROVE or statement.valid_until is None:
            continue
        if statement.valid_until - statement.signed_at > lifetime + CLOCK_SKEW:
            continue  # longer-lived than the policy allows: does not count
        if statement.signed_at - CLOCK_SKEW > now or now >= statement.valid_until:
            continue  # not yet, or lapsed
        if statement.signed_at + CLOCK_SKEW < submitted:
            continue  # signed before the application it names was submitted: not a review
        counted.append((member, statement.valid_until))
    counted.sort(key=lambda mv: mv[0].name)
    until = min((v for _, v in counted), default=now)
    return tuple(m for m, _ in counted), until


def _meets_policy(app: Application, approvers: tuple[Member, ...], committee: Committee) -> None:
    policy = committee.policy
    service_users = sum(1 for m in approvers if m.role is MemberRole.SERVICE_USER)
    need_su = policy.service_users_needed(app.max_tier)
    if len(approvers) < policy.min_approvals or service_users < need_su:
        tier = " (the highly sensitive tier is asked for)" if app.max_tier.rank >= 2 else ""
        raise NotApproved(
            f"the project needs current approval by at least {policy.min_approvals} committee "
            f"members including {need_su} service user(s){tier}; it has {len(approvers)}, "
            f"including {service_users} service user(s)"
        )


def _within_purpose_rules(app: Application, committee: Committee) -> None:
    rule = committee.policy.purposes[app.purpose]
    what = f"{app.purpose.value} projects"
    if app.max_tier.rank > rule.max_tier.rank:
        raise NotApproved(f"{what} may not read the {app.max_tier.value} tier")
    if app.max_epsilon_per_query > rule.max_epsilon_per_query:
        raise NotApproved(f"{what} may spend at most ε {rule.max_epsilon_per_query:g} per query")
    if app.epsilon_per_trust > rule.max_epsilon_per_trust:
        raise NotApproved(f"{what} may spend at most ε {rule.max_epsilon_per_trust:g} per trust")
    if app.suppress_below < rule.min_suppress_below:
        raise NotApproved(f"{what} must suppress counts below {rule.min_suppress_below}")


def _participation(app: Application, trust: TrustPolicy, signed: list[Statement]) -> str:
    if trust.trust not in app.trusts:
        raise NotApproved("this trust is not named in the project's application")
    if app.purpose in trust.refuse_purposes:
        raise NotApproved(f"this trust does not take part in {app.purpose.value} projects")
    if signed:
        latest = max(signed, key=lambda s: (s.signed_at, s.participation is Participation.REFUSE))
        if latest.participation is Participation.REFUSE:
            raise NotApproved("this trust's data guardian declined to take part in the project")
        return "signed by the data guardian"
    if app.purpose in trust.accept_purposes:
        return "by the trust's policy"
    raise NotApproved("this trust's data guardian has not signed its participation in the project")
