"""The custodian's Prometheus metrics, in a registry of their own.

Label sets are small and fixed: no instance names as labels. The per-deployment
gauges carry the deployment name, which the custodian's operator chooses and
which stays few; they are refreshed from the ledger by the sweeper.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ENROL_REFUSAL_REASONS = (
    "token",
    "nonce",
    "csr",
    "evidence",
    "binding",
    "policy",
    "format",
    "deployment",
    "ek",
    "credential",
    "collateral",
)
# Refusals whose audit entries are sampled (custodian.throttle.AuditSampler).
AUDIT_SAMPLED_KINDS = ("enrol", "receipt")
# The same as custodian.metering.RECEIPT_REFUSAL_REASONS (metrics imports nothing of the domain).
RECEIPT_REFUSAL_REASONS = ("format", "signature", "binding", "replay", "sequence", "chain", "usage")


class _Usage(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def balance(self) -> int: ...
    @property
    def leased(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def suspended(self) -> bool: ...
    @property
    def instances(self) -> int: ...
    @property
    def unreported(self) -> int: ...


class CustodianMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "custos_custodian_requests_total",
            "gRPC calls handled, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.enrolments = Counter(
            "custos_custodian_enrolments_total", "Enclave instances enrolled", registry=r
        )
        self.enrol_refusals = Counter(
            "custos_custodian_enrol_refusals_total", "Enrolments refused, by reason", ["reason"], registry=r
        )
        for reason in ENROL_REFUSAL_REASONS:
            self.enrol_refusals.labels(reason)
        self.audit_skipped = Counter(
            "custos_custodian_audit_skipped_total",
            "Refusals counted but not written to the audit log: over their caller's sample rate, by kind",
            ["kind"],
            registry=r,
        )
        for kind in AUDIT_SAMPLED_KINDS:
            self.audit_skipped.labels(kind)
        self.collateral_cache_fallbacks = Counter(
            "custos_custodian_collateral_cache_fallbacks_total",
            "Collateral served from the cache because the vendor's service was unreachable",
            ["vendor"],
            registry=r,
        )
        self.units_granted = Counter(
            "custos_custodian_units_granted_total", "Inference units granted", registry=r
        )
        self.units_revoked = Counter(
            "custos_custodian_units_revoked_total", "Inference units revoked", registry=r
        )
        self.units_used = Counter(
            "custos_custodian_units_used_total", "Inference units reported used", registry=r
        )
        self.units_overdrawn = Counter(
            "custos_custodian_units_overdrawn_total",
            "Units reported used after their lease was cut, beyond what the balance could cover",
            registry=r,
        )
        self.units_unreported = Counter(
            "custos_custodian_units_unreported_total",
            "Units charged for leases that expired without a final receipt",
            registry=r,
        )
        self.receipts = Counter("custos_custodian_receipts_total", "Usage receipts accepted", registry=r)
        self.receipt_refusals = Counter(
            "custos_custodian_receipt_refusals_total",
            "Usage reports refused for their receipt, by reason",
            ["reason"],
            registry=r,
        )
        for reason in RECEIPT_REFUSAL_REASONS:
            self.receipt_refusals.labels(reason)
        self.leases_opened = Counter("custos_custodian_leases_opened_total", "Leases opened", registry=r)
        self.leases_closed = Counter(
            "custos_custodian_leases_closed_total", "Leases closed, by how", ["how"], registry=r
        )
        for how in ("final", "expired"):
            self.leases_closed.labels(how)
        self.model_pushes = Counter(
            "custos_custodian_model_pushes_total", "Models pushed to enclaves", registry=r
        )
        self.model_bytes_pushed = Counter(
            "custos_custodian_model_bytes_pushed_total", "Ciphertext bytes of models pushed", registry=r
        )
        self.watch_streams = Gauge("custos_custodian_watch_streams", "Control streams open", registry=r)
        self.control_pushes = Counter(
            "custos_custodian_control_pushes_total",
            "Lease changes pushed on control streams when a deployment changed (heartbeats not counted)",
            registry=r,
        )
        self.collateral_stale = Gauge(
            "custos_custodian_collateral_stale",
            "1 while a cached Intel collateral document is served because its service is unreachable",
            ["document"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "custos_custodian_rpc_seconds",
            "gRPC call latency (streams: until they end)",
            ["method"],
            registry=r,
        )
        self._deployment_gauges = {
            field: Gauge(f"custos_custodian_deployment_{field}", text, ["deployment"], registry=r)
            for field, text in (
                ("balance", "Free units of the deployment"),
                ("leased", "Units held by active leases and not used yet"),
                ("used", "Units reported used"),
                ("suspended", "1 while the deployment is suspended"),
                ("instances", "Enrolled enclave instances"),
                ("unreported", "Units charged for expired leases beyond their receipts"),
            )
        }

    def observe_deployments(self, usages: Iterable[_Usage]) -> None:
        """Set the per-deployment gauges from a fresh read of the ledger."""
        for usage in usages:
            for field, gauge in self._deployment_gauges.items():
                gauge.labels(usage.name).set(float(getattr(usage, field)))
