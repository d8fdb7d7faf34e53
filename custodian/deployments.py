"""Deployments: a model lent under a manifest, with a join token, a balance and a kill switch.

The admin operations of the console live here: create a deployment (approving
its manifest), rotate its join token, grant and revoke units, suspend and
resume, and the usage listing (the enclave listing is ``custodian.roster``).
Every change is audited with its ``origin`` (which admin listener, which
console). Changes that enclaves must hear about at once are pushed through the
control bus after they commit.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace

from custodian import quota
from custodian.config import CustodianConfig, check_name
from custodian.control import ControlBus
from custodian.enrolment import token_digest
from custodian.errors import InvalidRequestError, NotFoundError, RefusedError
from custodian.ledger import DeploymentRecord, InstanceRecord, Ledger, ModelRecord, Transaction
from custodian.metrics import CustodianMetrics
from enclave.attestation import ReferenceValues
from enclave.attestation.platforms import PLATFORMS
from enclave.receipts import TokenCounts

logger = logging.getLogger(__name__)

ADMIN = "admin"


@dataclass(frozen=True)
class DeploymentUsage:
    name: str
    model: str
    suspended: bool
    balance: int
    # Units held by active leases and not used yet.
    leased: int
    used: int
    granted_total: int
    offline_grace_seconds: int
    lease_size: int
    # Instances holding an active lease: an instance that stopped or whose lease expired is not live.
    instances: int
    # Units charged for expired leases beyond their receipts (``used`` counts only what receipts prove).
    unreported: int
    zeroize_after_seconds: int
    revoked: int = 0
    overdrawn: int = 0
    # "inference" (a classifier's call) or "token" (a language model's).
    unit: str = "inference"
    # A language model's: of ``used``, the prompt and completion tokens.
    prompt_tokens: int = 0
    completion_tokens: int = 0


JOIN_TOKEN_PREFIX = "cjt_"  # noqa: S105 - a format prefix, not a secret


def new_join_token() -> str:
    """256 random bits, prefixed so that a token never starts with '-' on a command line."""
    return JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


class Deployments:
    def __init__(
        self,
        ledger: Ledger,
        config: CustodianConfig,
        bus: ControlBus,
        metrics: CustodianMetrics,
        *,
        custodian_ca_sha256: str,
        ak_ca_pem: bytes,
    ) -> None:
        self._ledger = ledger
        self._config = config
        self._bus = bus
        self._metrics = metrics
        self._ca_sha256 = custodian_ca_sha256
        self._ak_ca_pem = ak_ca_pem

    async def create(
        self,
        name: str,
        *,
        model: str,
        manifest: str,
        offline_grace_seconds: int,
        lease_size: int,
        zeroize_after_seconds: int = 0,
        origin: str = "",
    ) -> str:
        """Create the deployment and return its join token (shown once; only its SHA-256 is kept)."""
        check_name("deployment", name)
        grace = self._config.offline_grace(offline_grace_seconds)
        size = self._config.lease_size(lease_size)
        zeroize_after = self._config.zeroize_after(zeroize_after_seconds, grace)
        reference = ReferenceValues.from_toml(manifest)
        if reference.platform not in PLATFORMS:
            raise InvalidRequestError(
                f"manifest platform {reference.platform!r} has no verifier (known: {', '.join(PLATFORMS)})"
            )
        if reference.custodian_ca_sha256 != self._ca_sha256:
            raise InvalidRequestError(
                f"manifest pins custodian CA {reference.custodian_ca_sha256},"
                f" this custodian's CA is {self._ca_sha256}"
            )
        token = new_join_token()
        async with self._ledger.transaction() as tx:
            record = await _model(tx, model)
            approved = self._trusting_our_aks(reference.with_models(record.sha384.hex()))
            await tx.add_deployment(
                DeploymentRecord(
                    name=name,
                    model_id=record.model_id,
                    manifest=approved.to_toml(),
                    token_sha256=token_digest(token),
                    offline_grace_seconds=grace,
                    lease_size=size,
                    suspended=False,
                    account=quota.Account(),
                    created_at=tx.now,
                    zeroize_after_seconds=zeroize_after,
                )
            )
            await tx.audit(
                ADMIN,
                "deployment.create",
                name,
                {
                    "model": model,
                    "platform": approved.platform,
                    "allow_simulation": approved.allow_simulation,
                    "allow_unmeasured_os": approved.allow_unmeasured_os,
                    "offline_grace": grace,
                    "lease_size": size,
                    "zeroize_after": zeroize_after,
                    "origin": origin,
                },
            )
        logger.info("deployment %s created for model %s", name, model)
        for warning in approved.warnings:
            logger.warning("deployment %s: %s", name, warning)
        return token

    async def rotate_token(self, name: str, *, origin: str = "") -> str:
        token = new_join_token()
        async with self._ledger.transaction() as tx:
            deployment = await _deployment(tx, name)
            await tx.update_deployment(replace(deployment, token_sha256=token_digest(token)))
            await tx.audit(ADMIN, "deployment.rotate_token", name, {"origin": origin})
        return token

    async def manifest(self, name: str) -> str:
        """The approved manifest: the one given at creation, with the deployment's model allowed.

        A tpm deployment's names the AK CA as ``[tpm] ak_roots`` now, whatever was stored when it
        was created (an older custodian stored its enclave CA there)."""
        async with self._ledger.transaction() as tx:
            stored = (await _deployment(tx, name)).manifest
        reference = ReferenceValues.from_toml(stored)
        return self._trusting_our_aks(reference).to_toml() if reference.platform == "tpm" else stored

    def _trusting_our_aks(self, reference: ReferenceValues) -> ReferenceValues:
        """Platform tpm: end users trust the AKs the AK CA certified after credential activation
        (enrolment itself checks the manifest's ek_roots). Never the enclave CA: it certifies the
        instances' software keys."""
        if reference.platform != "tpm":
            return reference
        return replace(reference, tpm_ak_roots=self._ak_ca_pem.decode())

    async def grant(self, name: str, units: int, *, origin: str = "") -> tuple[DeploymentUsage, int]:
        async with self._ledger.transaction() as tx:
            deployment = await _deployment(tx, name)
            deployment = replace(deployment, account=quota.grant(deployment.account, units))
            await tx.update_deployment(deployment)
            await tx.audit(
                ADMIN,
                "quota.grant",
                name,
                {"units": units, "balance": deployment.account.balance, "origin": origin},
            )
            await tx.notify(name)
            usage = await _usage(tx, deployment)
        self._metrics.units_granted.inc(units)
        self._bus.notify(name)
        return usage, units

    async def revoke(
        self, name: str, *, units: int, everything: bool, origin: str = ""
    ) -> tuple[DeploymentUsage, int]:
        """Take ``units`` (or everything) back: the balance first, then the active leases' unused units."""
        if everything == (units != 0):
            raise InvalidRequestError("revoke takes either a number of units or --all, not both or neither")
        async with self._ledger.transaction() as tx:
            deployment = await _deployment(tx, name)
            leases = await tx.active_leases(name)
            account, allotments, changed = quota.revoke(
                deployment.account, [lease.units for lease in leases], None if everything else units
            )
            for lease, units_left in zip(leases, allotments, strict=True):
                if units_left != lease.units:
                    await tx.update_lease(replace(lease, units=units_left))
            deployment = replace(deployment, account=account)
            await tx.update_deployment(deployment)
            await tx.audit(
                ADMIN,
                "quota.revoke",
                name,
                {"requested": "all" if everything else units, "revoked": changed, "origin": origin},
            )
            await tx.notify(name)
            usage = await _usage(tx, deployment)
        self._metrics.units_revoked.inc(changed)
        self._bus.notify(name)
        return usage, changed

    async def suspend(self, name: str, *, origin: str = "") -> DeploymentUsage:
        return await self._set_suspended(name, True, origin)

    async def resume(self, name: str, *, origin: str = "") -> DeploymentUsage:
        return await self._set_suspended(name, False, origin)

    async def _set_suspended(self, name: str, suspended: bool, origin: str) -> DeploymentUsage:
        async with self._ledger.transaction() as tx:
            deployment = replace(await _deployment(tx, name), suspended=suspended)
            await tx.update_deployment(deployment)
            action = "deployment.suspend" if suspended else "deployment.resume"
            await tx.audit(ADMIN, action, name, {"origin": origin})
            await tx.notify(name)
            usage = await _usage(tx, deployment)
        logger.info("deployment %s %s", name, "suspended" if suspended else "resumed")
        self._bus.notify(name)
        return usage

    async def usage(self, name: str | None = None) -> list[DeploymentUsage]:
        async with self._ledger.transaction() as tx:
            deployments = [await _deployment(tx, name)] if name else await tx.deployments()
            return [await _usage(tx, d) for d in deployments]

    async def release_model(self, instance: InstanceRecord) -> ModelRecord:
        """The model an instance's deployment lends, recorded as pushed; refused while suspended."""
        async with self._ledger.transaction() as tx:
            deployment = await _deployment(tx, instance.deployment)
            if deployment.suspended:
                raise RefusedError(f"deployment {deployment.name!r} is suspended")
            model = await tx.model_by_id(deployment.model_id)
            if model is None:
                raise NotFoundError(f"deployment {deployment.name!r} names a model that is gone")
            await tx.audit(
                f"enclave:{instance.instance_id}", "model.push", deployment.name, {"model": model.name}
            )
            return model


async def _deployment(tx: Transaction, name: str) -> DeploymentRecord:
    deployment = await tx.deployment(name)
    if deployment is None:
        raise NotFoundError(f"no deployment {name!r}")
    return deployment


async def _model(tx: Transaction, name: str) -> ModelRecord:
    model = await tx.model(name)
    if model is None:
        raise NotFoundError(f"no model {name!r}")
    return model


async def _usage(tx: Transaction, deployment: DeploymentRecord) -> DeploymentUsage:
    model = await tx.model_by_id(deployment.model_id)
    leases = await tx.active_leases(deployment.name)
    language = model is not None and model.kind == "language"
    tokens = await tx.token_totals(deployment.name) if language else TokenCounts()
    return DeploymentUsage(
        name=deployment.name,
        model=model.name if model else "",
        suspended=deployment.suspended,
        balance=deployment.account.balance,
        leased=quota.held([lease.units for lease in leases]),
        used=deployment.account.used,
        granted_total=deployment.account.granted,
        offline_grace_seconds=deployment.offline_grace_seconds,
        lease_size=deployment.lease_size,
        instances=len({lease.instance_id for lease in leases}),
        unreported=deployment.account.unreported,
        zeroize_after_seconds=deployment.zeroize_after_seconds,
        revoked=deployment.account.revoked,
        overdrawn=deployment.account.overdrawn,
        unit="token" if language else "inference",
        prompt_tokens=tokens.prompt,
        completion_tokens=tokens.completion,
    )
