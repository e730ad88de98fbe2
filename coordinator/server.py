"""``fedtre coordinator serve``: the researcher-facing gRPC server, the links to every trust, and
the hub that outbound-only (dial-out) trusts connect to.

At start-up the coordinator asks every connected trust who it is (``Describe``) and refuses to
send queries to one that serves another catalog. A monitor checks the trusts every few
seconds, logs every change for operators, and reports ``NOT_SERVING`` on the health service
while some project's rule cannot be met (a trust it needs is down or mismatched).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from coordinator.config import CoordinatorConfig, Project
from coordinator.dial_in import DialInLink
from coordinator.dial_out import DialOutLink, LinkHub
from coordinator.engine import CoordinatorEngine
from coordinator.fanout import Trusts
from coordinator.links import LinkDown, TrustLink
from coordinator.metrics import CoordinatorMetrics
from coordinator.projects import ProjectBook
from coordinator.service import ResearcherServicer
from fedtre import logs
from fedtre.audit.events import Event
from fedtre.audit.recovery import AuditRecovery
from fedtre.errors import ConfigError, InternalError
from fedtre.metrics_http import serve_metrics
from fedtre.pki import Role
from fedtre.serde.common import MAX_REQUEST_BYTES, MAX_RESULT_BYTES
from fedtre.serving import Health, Running, bound_address, build_server
from fedtre.tls import CallerPolicy, Peer, TlsFiles, peer_identity
from fedtre.v2 import coordinator_pb2_grpc, link_pb2_grpc

log = logs.get("coordinator")
SERVICE_NAME = "fedtre.v2.ResearcherService"
LINK_SERVICE = "fedtre.v2.TrustLinkService"
INSECURE_RESEARCHER = "dev"
MONITOR_SECONDS = 2.0
DESCRIBE_SECONDS = 3.0
# Each trust is described this often: its audit checkpoint is kept here, and it keeps the
# coordinator's and the other trusts' (an entry or two in each log per look).
WITNESS_SECONDS = 300.0
AUDITED_REQUEST_BYTES = 1024 * 1024


def create_server(
    config: CoordinatorConfig, *, insecure: bool = False
) -> Running[CoordinatorEngine]:
    tls = None if insecure else _tls(config)
    dial_out = frozenset(n for n, e in config.nodes.items() if e.dial_out)
    refused: list[Callable[[str, str, str], None]] = []  # the engine's audit, once it exists

    def link_refused(method: str, who: str, why: str) -> None:
        for audit in refused:
            audit(method, who, why)

    monitors: list[TrustMonitor] = []  # told at once when a dial-out link opens or closes

    def link_changed(node: str, up: bool, why: str) -> None:
        _log_link(node, up, why)
        for m in monitors:  # not on the stream's own thread: the check talks over it
            threading.Thread(target=m.check, name="trust-monitor-now", daemon=True).start()

    hub = LinkHub(dial_out, config.catalog.version, on_change=link_changed, on_refused=link_refused)
    links: dict[str, TrustLink] = {
        nid: DialOutLink(nid, hub) if e.dial_out else DialInLink(nid, e.address, tls)
        for nid, e in config.nodes.items()
    }
    engine = CoordinatorEngine(config, Trusts(links))
    # wired before the server starts: a write that fails from the first call holds its health
    recovery = AuditRecovery(engine.audit, log)
    engine.audit.on_failed = recovery.failed
    try:

        def researcher(context: grpc.ServicerContext) -> str:
            if insecure:
                return INSECURE_RESEARCHER
            peer = peer_identity(context)
            if peer is None or peer.role is not Role.RESEARCHER:  # CallerPolicy admits none
                raise ConfigError("no researcher certificate on a mutual-TLS server")
            return peer.name

        def add(server: grpc.Server) -> None:
            coordinator_pb2_grpc.add_ResearcherServiceServicer_to_server(
                ResearcherServicer(engine, researcher), server
            )
            if dial_out:
                link_pb2_grpc.add_TrustLinkServiceServicer_to_server(hub, server)

        def audit_refusal(method: str, who: str, why: str) -> None:
            with contextlib.suppress(InternalError):  # refused either way
                engine.audit.write(Event.CALL_REFUSED, method=method, caller=who, reason=why)

        refused.append(audit_refusal)

        def node_link(peer: Peer) -> bool:
            return peer.role is Role.NODE and peer.name in dial_out

        server, port, health = build_server(
            address=config.listen,
            tls=tls,
            policy=None
            if insecure
            else CallerPolicy(
                _researchers_only,
                by_prefix={f"/{LINK_SERVICE}/": node_link},
                on_refused=audit_refusal,
                max_request_bytes=MAX_REQUEST_BYTES,
                revoked=engine.crl.problem if engine.crl is not None else None,
            ),
            # every open dial-out stream holds one worker thread
            max_workers=config.max_workers + len(dial_out),
            # dial-out trusts send their answers in; researchers' requests are refused above
            # 64 KiB by the policy (audited), above this by gRPC itself
            max_receive_bytes=MAX_RESULT_BYTES if dial_out else AUDITED_REQUEST_BYTES,
            max_send_bytes=2 * MAX_RESULT_BYTES,
            service_names=(SERVICE_NAME, *((LINK_SERVICE,) if dial_out else ())),
            add_services=add,
        )
    except BaseException:
        engine.close()
        raise
    address = bound_address(config.listen, port)
    engine.audit.write(Event.COORDINATOR_SERVING, address=address, tls=not insecure)
    monitor = TrustMonitor(
        config,
        engine.trusts,
        links,
        health,
        engine.book,
        witness=engine.witness,
        share=engine.shared_checkpoints,
    )
    monitors.append(monitor)
    recovery.watch(health)
    running = Running(
        server,
        port,
        address,
        health,
        engine,
        audit_refusal=audit_refusal,
        stoppers=[recovery.stop],
    )
    if config.metrics_listen:
        metrics = CoordinatorMetrics(monitor.state)
        engine.on_query = metrics.observe
        engine.audit.on_write = lambda durable, seconds: metrics.audit_write.labels(
            "full" if durable else "normal"
        ).observe(seconds)
        endpoint, metrics_port = serve_metrics(
            config.metrics_listen,
            metrics.registry,
            lambda: health.serving,
            documents={"/trusts": monitor.report},
        )
        running.stoppers.append(endpoint.shutdown)
        running.metrics_address = bound_address(config.metrics_listen, metrics_port)
    engine.on_close(hub.close)
    engine.on_close(monitor.stop)
    monitor.start()
    log.info(
        "serving",
        extra={"coordinator": config.coordinator_id, "address": address, "tls": not insecure},
    )
    return running


class TrustMonitor:
    """Every few seconds: which trusts are reachable (a dial-in channel that is not failing, a
    dial-out stream that is open). A trust is asked ``Describe`` when it (re)appears, and one
    that serves another catalog is never sent a query. Logs every change for operators, and
    keeps the health service at ``NOT_SERVING`` while some project's rule cannot be met."""

    def __init__(
        self,
        config: CoordinatorConfig,
        trusts: Trusts,
        links: Mapping[str, TrustLink],
        health: Health,
        book: ProjectBook | None = None,
        witness: Callable[[str, str], object] = lambda trust, checkpoint: None,
        share: Callable[[str], tuple[str, ...]] = lambda trust: (),
    ) -> None:
        self.config = config
        self.witness = witness  # keeps each trust's signed audit checkpoint
        self.share = share  # checkpoints for each trust to keep
        self._described_at: dict[str, float] = {}
        self.book = book or ProjectBook(config)
        self.trusts = trusts
        self.links = links
        self.health = health
        self.up: dict[str, bool] = {}  # reachable
        self.ok: dict[str, bool] = {}  # reachable and serving this catalog
        self.reason: dict[str, str] = {}  # why a trust is down ("" when up)
        self.since: dict[str, str] = {}  # when its state last changed (UTC, ISO)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trust-monitor", daemon=True)

    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=DESCRIBE_SECONDS + 1)

    def _run(self) -> None:
        while not self._stop.wait(MONITOR_SECONDS):
            try:
                self.check()
            except Exception as exc:  # never stop watching the trusts
                log.error("trust monitor check failed", extra={"error": type(exc).__name__})

    def check(self) -> None:
        with self._lock:
            self._check()

    def _check(self) -> None:
        for nid, link in self.links.items():
            reachable = link.reachable()
            why = "" if reachable else "unreachable"
            last = self._described_at.get(nid)
            due = last is None or time.monotonic() - last >= WITNESS_SECONDS
            if reachable and (not self.up.get(nid) or due):  # (re)appeared, or time to look
                try:
                    description = link.describe(DESCRIBE_SECONDS, self._shared(nid))
                    self._described_at[nid] = time.monotonic()
                    self.trusts.described[nid] = description
                    if description.audit_checkpoint:
                        try:
                            self.witness(nid, description.audit_checkpoint)
                        except InternalError as exc:  # not witnessed this time; carry on
                            log.error(
                                "trust checkpoint not kept",
                                extra={"node": nid, "error": type(exc).__name__},
                            )
                    if description.catalog_version != self.config.catalog.version:
                        why = f"serves catalog {description.catalog_version[:32]}"
                        self.trusts.mismatched.add(nid)
                    else:
                        self.trusts.mismatched.discard(nid)
                except LinkDown as exc:
                    reachable, why = False, str(exc)
            ok = reachable and nid not in self.trusts.mismatched
            if self.ok.get(nid) != ok:  # a change (or the first look): log it, note when
                (log.info if ok else log.warning)(
                    "trust up" if ok else "trust down",
                    extra={"node": nid, "reason": why, "link": link.status()},
                )
                self.since[nid] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self.up[nid] = reachable
            self.ok[nid] = ok
            self.reason[nid] = "" if ok else why
        self.health.set(self.rules_met())

    def _shared(self, nid: str) -> tuple[str, ...]:
        """The checkpoints to send; none if this coordinator's log cannot be written now."""
        try:
            return self.share(nid)
        except InternalError as exc:
            log.error("own checkpoint not signed", extra={"error": type(exc).__name__})
            return ()

    def state(self) -> dict[str, bool]:
        """Each trust: reachable and serving this catalog (for metrics)."""
        return {t: self.ok.get(t, False) for t in self.links}

    def report(self) -> dict[str, Any]:
        """Each trust's state for operators (``fedtre coordinator trusts``), and the projects
        that cannot be answered now. Link addresses and reasons only: no data."""
        state = self.state()
        return {
            "trusts": [
                {
                    "trust": nid,
                    "up": state[nid],
                    "since": self.since.get(nid, ""),
                    "reason": self.reason.get(nid, "not checked yet"),
                    "link": link.status(),
                }
                for nid, link in sorted(self.links.items())
            ],
            "projects_waiting": sorted(
                listed.project.project_id
                for listed in self.book.approved()
                if not self._met(listed.project)
            ),
        }

    def rules_met(self) -> bool:
        return all(self._met(listed.project) for listed in self.book.approved())

    def _met(self, project: Project) -> bool:
        up = [t for t in project.trusts if self.ok.get(t)]
        return bool(up) and (len(up) == len(project.trusts) or project.allow_partial)


def _log_link(node: str, up: bool, why: str) -> None:
    log.info("trust link " + ("open" if up else "closed"), extra={"node": node, "reason": why})


def _researchers_only(peer: Peer) -> bool:
    return peer.role is Role.RESEARCHER


def _tls(config: CoordinatorConfig) -> TlsFiles:
    if config.ca is None or config.cert is None or config.key is None:
        raise ConfigError("the config has no [tls] (ca, cert, key); plaintext only with --insecure")
    return TlsFiles(ca=config.ca, cert=config.cert, key=config.key)
