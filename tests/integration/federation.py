"""A real federation for integration tests: three ``fedtre node serve`` processes and one or
more ``fedtre coordinator serve`` processes on loopback, ports chosen by the OS, mutual TLS
from a test CA, each started exactly as an operator would start it (``fedtre.launcher``)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from fedtre.launcher import DIAL_IN, DIAL_OUT, LocalFederation, ProjectSpec, TrustSpec
from fedtre.pki import Role, init_ca, issue
from fedtre.synthetic import generate
from node.loader import load_omop
from tests.conftest import private_database

TRUST_SIZES = {"trust-a": 1200, "trust-b": 2500, "trust-c": 4000}
PROJECT = "study"  # all trusts must answer
PARTIAL = "partial"  # partial results allowed
START_TIMEOUT = 60.0


def make_pki(directory: Path) -> Path:
    init_ca(directory)
    issue(directory, Role.COORDINATOR, "hub")
    for name in TRUST_SIZES:
        issue(directory, Role.NODE, name)
    issue(directory, Role.RESEARCHER, "alice")
    issue(directory, Role.RESEARCHER, "mallory")  # a valid researcher on no project
    # Wrong in one way each: another CA, expired, a node's cert for a name no node has.
    other = directory / "other-ca"
    init_ca(other)
    issue(other, Role.RESEARCHER, "alice")
    issue(other, Role.COORDINATOR, "hub")
    expired = directory / "expired"
    expired.mkdir()
    for f in ("ca.pem", "ca.key"):
        (expired / f).write_bytes((directory / f).read_bytes())
    now = dt.datetime.now(dt.UTC)
    issue(
        expired,
        Role.RESEARCHER,
        "alice",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    issue(
        expired,
        Role.COORDINATOR,
        "hub",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    return directory


def make_databases(directory: Path, catalog) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    out = {}
    for i, (name, persons) in enumerate(TRUST_SIZES.items()):
        omop = directory / f"{name}-omop"
        generate(omop, persons, seed=100 + i, person_id_offset=(i + 1) * 1_000_000)
        out[name] = directory / f"{name}.duckdb"
        load_omop(omop, out[name], catalog)
    return out


MODES = {
    "dial-in": {"trust-a": DIAL_IN, "trust-b": DIAL_IN, "trust-c": DIAL_IN},
    "dial-out": {"trust-a": DIAL_OUT, "trust-b": DIAL_OUT, "trust-c": DIAL_OUT},
    "mixed": {"trust-a": DIAL_OUT, "trust-b": DIAL_IN, "trust-c": DIAL_OUT},
}
PROJECTS = (
    ProjectSpec(PROJECT, researchers=("alice",)),
    ProjectSpec(PARTIAL, researchers=("alice",), allow_partial=True, suppress_below=10, round_to=5),
)


class Federation(LocalFederation):
    """The integration suite's federation: three trusts (``TRUST_SIZES``), projects ``study``
    (every trust must answer) and ``partial``, on the one launcher (``fedtre.launcher``)."""

    def __init__(
        self,
        work: Path,
        pki: Path,
        databases: dict[str, Path],
        deadline: float = 3.0,
        answer_slot_ms: int = 50,
        mode: str = "dial-in",
        coordinators: int = 1,
        budgets: dict[str, dict[str, float]] | None = None,
        lease_seconds: float | None = None,
        crl: Path | None = None,
    ) -> None:
        super().__init__(
            work=work,
            pki=pki,
            trusts=[
                TrustSpec(
                    name,
                    private_database(work / "databases" / name, path),
                    MODES[mode][name],
                    (budgets or {}).get(name, {}),
                )
                for name, path in databases.items()
            ],
            projects=PROJECTS,
            coordinators=coordinators,
            deadline=deadline,
            answer_slot_ms=answer_slot_ms,
            lease_seconds=lease_seconds,
            node_workers=4,
            crl=crl,
        )
        self.mode = mode

    def spent_units(self, name: str, scope: str = f"project:{PROJECT}") -> int:
        return super().spent_units(name, scope)

    def coordinator_serving(self) -> bool:
        """What the coordinator's standard health check says, asked as a researcher."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from fedtre.tls import TlsFiles, channel_credentials, channel_options

        files = TlsFiles.in_pki_dir(self.pki, Role.RESEARCHER, "alice")
        with grpc.secure_channel(
            self.coordinator.address, channel_credentials(files), options=channel_options("hub")
        ) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
