"""The researcher's Python API and the transport behind ``fedtre query``.

    from fedtre.client import Client
    client = Client.from_profile("researcher.toml")     # or FEDTRE_PROFILE
    result = client.query("mh-prevalence", "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex")
    result.to_pandas()       # or .to_arrow(), .table(), .to_json(), .to_csv()

A profile names the coordinator's address and certificate name and the researcher's own
certificate (identity comes from it, never from anything the client says). A query is retried
with the same query id when the coordinator cannot be reached, so a retry never spends twice.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedtre.answer import NotReleased, QueryResult
from fedtre.catalog import Catalog
from fedtre.errors import ConfigError, InternalError, QueryRefused, Refusal
from fedtre.explain import Explanation, explain
from fedtre.governance.query_signature import sign as sign_query
from fedtre.pki import Role, identity_problems
from fedtre.request import Submission
from fedtre.serde.common import MAX_RESULT_BYTES
from fedtre.serde.coordinator import (
    catalog_from_proto,
    project_budget_from_proto,
    project_budget_request_to_proto,
    project_list_from_proto,
    query_result_from_proto,
    submission_to_proto,
)
from fedtre.settings import check_keys, parse_listen, read_toml, resolve_path
from fedtre.status import failure_from
from fedtre.tls import TlsFiles, channel_credentials, channel_options
from fedtre.v2 import coordinator_pb2 as cpb
from fedtre.v2 import coordinator_pb2_grpc

PROFILE_ENV = "FEDTRE_PROFILE"
__all__ = [
    "Client",
    "ConnectionTrust",
    "CoordinatorUnavailable",
    "NotReleased",
    "Profile",
    "QueryResult",
]


class CoordinatorUnavailable(InternalError):
    """The coordinator could not be reached (after retries), or is up but answering nothing
    (its audit log cannot be written). ``query_id``: the query asked, when it was one (asking
    again with it never spends twice)."""

    def __init__(self, message: str, query_id: str = "") -> None:
        super().__init__(message)
        self.query_id = query_id


@dataclass(frozen=True)
class Profile:
    coordinator: str  # host:port
    coordinator_name: str  # the name on the coordinator's certificate
    tls: TlsFiles | None  # None: plaintext, development only

    @staticmethod
    def load(path: Path | str | None = None) -> Profile:
        raw = path or os.environ.get(PROFILE_ENV)
        if not raw:
            raise ConfigError(
                f"no researcher profile: pass --profile FILE or set {PROFILE_ENV} "
                "(a TOML file naming the coordinator and your certificate)"
            )
        path = Path(raw)
        data = read_toml(path, "researcher profile")
        allowed = {"coordinator", "coordinator_name", "ca", "cert", "key", "insecure"}
        if data.get("insecure") is True:
            check_keys(data, str(path), {"coordinator"}, allowed)
            address = parse_listen(data["coordinator"], f"{path}: coordinator")
            return Profile(address, str(data.get("coordinator_name", "")), None)
        check_keys(data, str(path), allowed - {"insecure"}, allowed)
        where = str(path)
        return Profile(
            coordinator=parse_listen(data["coordinator"], f"{path}: coordinator"),
            coordinator_name=str(data["coordinator_name"]),
            tls=TlsFiles(
                ca=resolve_path(data["ca"], path.parent, where),
                cert=resolve_path(data["cert"], path.parent, where),
                key=resolve_path(data["key"], path.parent, where),
            ),
        )


class ConnectionTrust(CoordinatorUnavailable):
    """The connection to the coordinator could not be trusted (TLS or identity): a setting to
    fix in the profile or the certificates, not an outage."""


class Client:
    def __init__(self, profile: Profile, timeout: float = 120.0, retries: int = 2) -> None:
        if profile.tls is not None:
            problems = identity_problems(profile.tls.ca, profile.tls.cert, profile.tls.key)
            if problems:
                raise ConnectionTrust("; ".join(problems))
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 2 * MAX_RESULT_BYTES)]
        if profile.tls is None:
            self._channel = grpc.insecure_channel(profile.coordinator, options=options)
        else:
            self._channel = grpc.secure_channel(
                profile.coordinator,
                channel_credentials(profile.tls),
                options=[*options, *channel_options(profile.coordinator_name, Role.COORDINATOR)],
            )
        self._stub = coordinator_pb2_grpc.ResearcherServiceStub(self._channel)
        self._tls = profile.tls  # its key signs each query (trusts check the signature)
        self.timeout = timeout
        self.retries = retries

    @classmethod
    def from_profile(cls, path: Path | str | None = None, **kwargs: Any) -> Client:
        return cls(Profile.load(path), **kwargs)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(
        self,
        project: str,
        sql: str,
        epsilon: float | None = None,
        query_id: str | None = None,
        *,
        raise_if_not_released: bool = True,
    ) -> QueryResult:
        """Run a query across the project's trusts. ``epsilon`` is spent at each trust
        (default: the project's default). Raises ``QueryRefused`` with a plain reason when the
        coordinator refuses, and ``NotReleased`` (with every trust's state on it) when the
        trusts' answers allow no release; ``raise_if_not_released=False`` returns that result
        instead. A partial result (``result.status == "partial"``) is returned."""
        query_id = query_id or f"q-{uuid.uuid4()}"
        signed = (
            None
            if self._tls is None
            else sign_query(self._tls.key, self._tls.cert, project, query_id, sql, epsilon)
        )
        sub = Submission(query_id, project, sql, epsilon, signed)
        try:
            reply = self._call(self._stub.Submit, submission_to_proto(sub))
        except ConnectionTrust:  # a setting to fix: no query reached the coordinator
            raise
        except CoordinatorUnavailable as exc:  # the trusts may have answered: say how to ask again
            raise CoordinatorUnavailable(
                f"{exc}; this query's id is {query_id}: ask again with it (fedtre query "
                "--query-id) and no trust spends twice",
                query_id=query_id,
            ) from None
        result = query_result_from_proto(reply)
        if not result.released and raise_if_not_released:
            raise NotReleased(result)
        return result

    def explain(self, project: str, sql: str, epsilon: float | None = None) -> Explanation:
        """What the query would cost at each trust and how precise it would be, from the
        coordinator's catalog and the project: nothing is spent and no trust is asked."""
        listing = project_list_from_proto(
            self._call(self._stub.ListProjects, cpb.ListProjectsRequest())
        )
        info = next((p for p in listing if p.project_id == project), None)
        if info is None:
            raise QueryRefused(
                Refusal.NOT_AUTHORISED,
                "No project with that id is open to you. Ask the project lead to add your name.",
            )
        return explain(sql, self.catalog(), info, epsilon)

    def projects(self) -> list[dict[str, Any]]:
        listing = self._call(self._stub.ListProjects, cpb.ListProjectsRequest())
        return [{**p.__dict__, "trusts": list(p.trusts)} for p in project_list_from_proto(listing)]

    def catalog(self) -> Catalog:
        """The federation's catalog as the coordinator serves it: views, columns, domains,
        bounds and sensitivity tiers (``fedtre.catalog.Catalog``)."""
        return catalog_from_proto(self._call(self._stub.Catalog, cpb.CatalogRequest()))

    def budget(self, project: str) -> list[dict[str, Any]]:
        request = project_budget_request_to_proto(project)
        reply = project_budget_from_proto(self._call(self._stub.Budget, request))
        return [
            {
                "trust": t.node_id,
                "epsilon_left": t.epsilon_left,
                "status": t.state,
                "reason": t.reason,
            }
            for t in reply.trusts
        ]

    def _call(self, method: Any, request: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                failure = failure_from(exc)
                if failure.refusal is not None or failure.code in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    raise QueryRefused(
                        failure.refusal or Refusal.NOT_AUTHORISED, failure.message
                    ) from None
                trust = _trust_problem(exc)
                if trust:
                    raise ConnectionTrust(trust) from None
                if not failure.unavailable or attempt == self.retries:
                    raise CoordinatorUnavailable(
                        f"the coordinator {failure.message} ({failure.code.name})"
                    ) from None
                time.sleep(0.5 * (attempt + 1))  # same query id: a retry never spends twice
        raise AssertionError("unreachable")


def _trust_problem(exc: grpc.RpcError) -> str:
    """A TLS or identity failure, told apart from "the coordinator is down", in words that say
    what to check. gRPC reports these as UNAVAILABLE; its details name the cause."""
    details = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
    text = details.lower()
    if "hostname verification" in text or "name mismatch" in text:
        return (
            "the coordinator's certificate does not carry the name in your profile "
            "(coordinator_name) as a coordinator's: check the name the operator gave you (a "
            "certificate issued before fedtre named roles in certificates must be reissued)"
        )
    if "certificate verify failed" in text or "certificate_verify_failed" in text:
        return (
            "the coordinator's certificate is not signed by the CA in your profile (ca): "
            "you may have another federation's CA, or the coordinator's certificate was renewed"
        )
    if "handshake failed" in text or ("ssl" in text and "alert" in text):
        return (
            "the secure connection to the coordinator failed during the handshake: the "
            "coordinator did not accept your certificate (expired, revoked, or from another "
            "federation's CA), or yours could not verify it; check ca, cert and key in your "
            "profile"
        )
    return ""
