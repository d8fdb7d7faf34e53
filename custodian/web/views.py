"""What each page shows, read from the services the admin API uses, as plain JSON-able dicts.

Every page renders one of these, and serves it as its JSON twin (``?format=json``),
which the page's refresh script and the tests read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from custodian.audit_file import ChainCheck
from custodian.audit_stream import LedgerAudit
from custodian.deployments import Deployments, DeploymentUsage
from custodian.errors import LedgerError, NotFoundError
from custodian.ledger import Ledger
from custodian.metrics import CustodianMetrics
from custodian.model_check import inputs_from_json
from custodian.model_store import ModelStore
from custodian.roster import EnclaveStatus, Roster
from custodian.web.evidence_book import EvidenceBook
from custodian.web.refusal_counts import RefusalCounts
from custodian.web.usage_history import SPANS, History, history, window
from enclave.attestation import ReferenceValues

AUDIT_PAGE = 50
# Refusals are counted from the audit log's newest entries (a rate-limited sample of them).
_REFUSAL_ACTIONS = ("enrol.refuse", "receipt.refuse")
_REFUSAL_SCAN = 2000
# What the refresh script updates; a language model's prompt and completion tokens too.
_USAGE_LIVE = ("balance", "leased", "used", "instances", "prompt_tokens", "completion_tokens")
_OVERVIEW_LIVE = (*_USAGE_LIVE, "online", "refusals_last_hour")
# Whose collateral a platform's evidence is appraised with (the others need none).
_VENDOR = {"tdx": "intel", "sgx": "intel", "sev-snp": "amd"}


@dataclass(frozen=True)
class ConsoleServices:
    deployments: Deployments
    roster: Roster
    store: ModelStore
    ledger: Ledger
    metrics: CustodianMetrics
    collateral_dir: Path
    evidence: EvidenceBook
    refusals: RefusalCounts


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else ""


def _usage(u: DeploymentUsage) -> dict[str, Any]:
    return dataclasses.asdict(u)


def _enclave(e: EnclaveStatus) -> dict[str, Any]:
    return {
        k: _iso(v) if isinstance(v, datetime) or v is None else v for k, v in dataclasses.asdict(e).items()
    }


class Views:
    def __init__(self, services: ConsoleServices) -> None:
        self._s = services
        self._chain = ChainCheck()
        self._chain_error = ""
        self._platforms: dict[str, str] = {}  # a deployment's manifest never changes

    async def overview(self) -> dict[str, Any]:
        usages = await self._s.deployments.usage()
        enclaves = await self._s.roster.enclaves()
        refusals = await self._refusals_last_hour()
        collateral = self._collateral()
        rows = []
        for u in usages:
            row = _usage(u)
            row["online"] = sum(1 for e in enclaves if e.deployment == u.name and e.connected)
            row["refusals_last_hour"] = refusals.get(u.name, 0)
            row["platform"] = await self._platform(u.name)
            row["collateral"] = _freshness(row["platform"], collateral)
            rows.append(row)
        counted = self._s.refusals.last_hour()
        live = {f"refusals.{kind}": str(n) for kind, n in counted["total"].items()}
        for row in rows:
            for key in _OVERVIEW_LIVE:
                live[f"{row['name']}.{key}"] = str(row[key])
            live[f"{row['name']}.state"] = "suspended" if row["suspended"] else "active"
        return {"deployments": rows, "collateral": collateral, "refusals": counted, "live": live}

    async def deployment(self, name: str, span: str, *, with_history: bool = True) -> dict[str, Any]:
        if span not in SPANS:
            span = "hour"
        (usage,) = await self._s.deployments.usage(name)
        enclaves = await self._s.roster.enclaves(name)
        manifest = await self._s.deployments.manifest(name)
        row = _usage(usage)
        row["platform"] = await self._platform(name, manifest)
        row["collateral"] = _freshness(row["platform"], self._collateral())
        live = {k: str(row[k]) for k in (*_USAGE_LIVE, "unreported")}
        live["state"] = "suspended" if usage.suspended else "active"
        for e in enclaves:
            live[f"{e.instance_id}.state"] = e.state
            live[f"{e.instance_id}.lease_used"] = str(e.lease_used)
        return {
            "deployment": row,
            "enclaves": [_enclave(e) for e in enclaves],
            "manifest": manifest,
            "history": (await self._history(name, span)).to_json() if with_history else None,
            "live": live,
        }

    async def enclave(self, instance_id: str) -> dict[str, Any]:
        found = [e for e in await self._s.roster.enclaves() if e.instance_id == instance_id]
        if not found:
            raise NotFoundError(f"no enclave instance {instance_id!r}")
        enclave = _enclave(found[0])
        live = {k: str(enclave[k]) for k in ("state", "lease_used", "lease_limit", "last_receipt_seq")}
        recorded = self._s.evidence.get(instance_id)
        return {"enclave": enclave, "evidence": recorded.to_json() if recorded else None, "live": live}

    async def models(self) -> dict[str, Any]:
        models = await self._s.store.models()
        usages = await self._s.deployments.usage()
        return {
            "models": [
                {
                    "name": m.name,
                    "kind": m.kind,
                    "sha384": m.sha384.hex(),
                    "size": m.size,
                    "chunk_count": m.chunk_count,
                    "created_at": _iso(m.created_at),
                    "inputs": "; ".join(i.describe() for i in inputs_from_json(m.inputs)),
                    "deployments": [u.name for u in usages if u.model == m.name],
                }
                for m in models
            ],
            "live": {},
        }

    async def audit(self, *, subject: str, action: str, before: int) -> dict[str, Any]:
        async with self._s.ledger.transaction() as tx:
            entries = await tx.audit_search(subject=subject, action=action, before=before, limit=AUDIT_PAGE)
        chain = await self.chain_state()
        older = entries[-1].seq if len(entries) == AUDIT_PAGE else 0
        return {
            "entries": [
                {
                    "seq": e.seq,
                    "at": e.at,
                    "actor": e.actor,
                    "action": e.action,
                    "subject": e.subject,
                    "detail": dict(e.detail),
                }
                for e in entries
            ],
            "filter": {"subject": subject, "action": action, "before": before},
            "older": older,
            "chain": chain,
            "live": {"chain.length": str(chain["length"]), "chain.state": chain["state"]},
        }

    async def chain_state(self) -> dict[str, Any]:
        """The audit chain checked from where the last check stopped (entries are only appended)."""
        if not self._chain_error:
            try:
                async for entry in LedgerAudit(self._s.ledger).entries(after=self._chain.next_seq - 1):
                    self._chain.add(entry)
            except LedgerError as exc:
                self._chain_error = str(exc)
        state = "broken" if self._chain_error else "verified"
        return {
            "state": state,
            "length": self._chain.length,
            "error": self._chain_error,
            "last_hash": self._chain.last_hash.hex(),
        }

    async def _history(self, name: str, span: str) -> History:
        now = self._s.ledger.now()
        first = window(span, now)[0]
        async with self._s.ledger.transaction() as tx:
            receipts = await tx.receipts_since(name, first)
            earlier: dict[str, int] = {}
            for r in receipts:
                if r.lease_id not in earlier:
                    before = await tx.receipt(r.instance_id, r.seq - 1) if r.seq > 1 else None
                    earlier[r.lease_id] = before.used if before and before.lease_id == r.lease_id else 0
            grants = await tx.audit_search(subject=name, action="quota.grant", limit=10_000)
        return history(span, now, receipts, grants, earlier_used=earlier)

    async def _refusals_last_hour(self) -> dict[str, int]:
        since = self._s.ledger.now() - timedelta(hours=1)
        counts: dict[str, int] = {}
        async with self._s.ledger.transaction() as tx:
            for action in _REFUSAL_ACTIONS:
                for entry in await tx.audit_search(action=action, limit=_REFUSAL_SCAN):
                    if datetime.fromisoformat(entry.at) >= since:
                        counts[entry.subject] = counts.get(entry.subject, 0) + 1
        return counts

    async def _platform(self, name: str, manifest: str = "") -> str:
        """The platform a deployment's manifest names (read once: a manifest never changes)."""
        if name not in self._platforms:
            manifest = manifest or await self._s.deployments.manifest(name)
            self._platforms[name] = ReferenceValues.from_toml(manifest).platform
        return self._platforms[name]

    def _collateral(self) -> dict[str, Any]:
        """Each cached vendor document: its age, and whether it is served stale (service unreachable)."""
        stale = {
            s.labels["document"]: s.value
            for metric in self._s.metrics.collateral_stale.collect()
            for s in metric.samples
        }
        now = self._s.ledger.now().timestamp()
        documents = []
        for vendor in ("intel", "amd"):
            folder = self._s.collateral_dir / vendor
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.name.endswith(".issuer-chain.pem") or not path.is_file():
                    continue
                documents.append(
                    {
                        "vendor": vendor,
                        "file": path.name,
                        "age_hours": round((now - path.stat().st_mtime) / 3600, 1),
                    }
                )
        return {"files": documents, "stale": [d for d, v in sorted(stale.items()) if v]}


def _freshness(platform: str, collateral: dict[str, Any]) -> dict[str, Any]:
    """The collateral a deployment's platform is appraised with: its vendor's documents, the oldest's age."""
    vendor = _VENDOR.get(platform, "")
    ages = [d["age_hours"] for d in collateral["files"] if d["vendor"] == vendor]
    return {
        "vendor": vendor,
        "documents": len(ages),
        "oldest_hours": max(ages) if ages else None,
        # Only Intel's documents are served stale (AMD's CRL fallbacks are counted, not flagged).
        "stale": collateral["stale"] if vendor == "intel" else [],
    }
