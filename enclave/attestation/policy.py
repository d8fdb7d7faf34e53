"""Check attested claims against reference values, reporting every mismatch."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from enclave.attestation.claims import INSTANCE_KIND, AttestedClaims, canonical_json
from enclave.attestation.interface import PlatformClaims
from enclave.attestation.manifest import DCAP_PLATFORMS, TEE_PLATFORMS, ReferenceValues
from enclave.errors import PolicyError


def check(
    claims: AttestedClaims,
    platform: PlatformClaims,
    reference: ReferenceValues,
    *,
    require_model: bool,
    ak_trust_by_credential: bool = False,
) -> None:
    """Raise ``PolicyError`` listing every way the claims miss the reference values.

    ``ak_trust_by_credential``: the caller establishes trust in a TPM's AK by
    credential activation itself, so ``tpm`` evidence need not carry an AK
    certificate (see :func:`enclave.attestation.appraisal.appraise`).
    """
    mismatches: list[str] = []
    if platform.platform != reference.platform:
        mismatches.append(f"platform is {platform.platform!r}, manifest expects {reference.platform!r}")
    if platform.simulated and not reference.allow_simulation:
        mismatches.append("evidence is simulated and the manifest does not allow simulation")
    for name, expected in sorted(reference.registers.items()):
        actual = platform.registers.get(name)
        if actual is None:
            mismatches.append(f"register {name} is not in the evidence")
        elif actual.hex() != expected:
            mismatches.append(f"register {name} is {actual.hex()}, manifest expects {expected}")
    if platform.platform == "tpm" and not ak_trust_by_credential:
        trust = platform.details.get("ak_trust")
        if trust != "certificate":
            mismatches.append(
                f"TPM attestation key trust is {trust!r}: the evidence has no AK certificate chaining "
                "to the manifest's [tpm] ak_roots, and no credential activation vouched for it"
            )
    mismatches += _check_tee(platform, reference)
    mismatches += _check_instance(claims)
    mismatches += _check_code(claims, reference)
    mismatches += _check_config(claims, reference)
    mismatches += _check_model(claims, reference, require_model=require_model)
    if mismatches:
        raise PolicyError(mismatches)


def _check_tee(platform: PlatformClaims, reference: ReferenceValues) -> list[str]:
    return tee_mismatches(platform.platform, platform.details, reference)


def tee_mismatches(platform: str, details: Mapping[str, Any], reference: ReferenceValues) -> list[str]:
    """TCB status (tdx, sgx: DCAP), debug mode (tdx, sgx, sev-snp) and SEV-SNP guest policy
    and minimum TCB, from a verifier's details. Also used by custos-verify."""
    problems: list[str] = []
    if platform in DCAP_PLATFORMS:
        status = details.get("tcb_status")
        if status is None:
            problems.append(
                "TCB status was not evaluated (no TCB info collateral); the manifest requires one"
            )
        elif status not in reference.accepted_tcb_statuses:
            accepted = ", ".join(reference.accepted_tcb_statuses)
            problems.append(f"TCB status is {status}, manifest accepts {accepted}")
    if platform in TEE_PLATFORMS:
        policy = details.get("policy")
        debug = policy.get("debug") if isinstance(policy, dict) else details.get("debug")
        if debug is not False and not reference.allow_debug:
            problems.append(
                "the TEE runs in debug mode (or does not say), and the manifest does not allow debug"
            )
    if platform == "sev-snp":
        problems += _check_snp(details, reference)
    return problems


def _check_snp(details: Mapping[str, Any], reference: ReferenceValues) -> list[str]:
    """Guest policy (migration agent) and the minimum REPORTED_TCB of an SEV-SNP guest."""
    problems: list[str] = []
    policy = details.get("policy")
    migrate_ma = policy.get("migrate_ma") if isinstance(policy, dict) else None
    if migrate_ma is not False and not reference.snp_allow_migration_agent:
        problems.append("guest policy allows a migration agent (or does not say); the manifest does not")
    reported = details.get("reported_tcb")
    for component, minimum in sorted(reference.snp_min_tcb.items()):
        value = reported.get(component) if isinstance(reported, dict) else None
        if not isinstance(value, int):
            problems.append(f"REPORTED_TCB has no {component} component; the manifest requires >= {minimum}")
        elif value < minimum:
            problems.append(f"REPORTED_TCB {component} is {value}, manifest requires >= {minimum}")
    return problems


def _single(claims: AttestedClaims, kind: str) -> tuple[list[str], bytes | None, dict[str, str]]:
    events = claims.events(kind)
    if len(events) != 1:
        return [f"measurement log has {len(events)} {kind} events, expected exactly one"], None, {}
    return [], events[0].sha384, dict(events[0].detail)


def _check_instance(claims: AttestedClaims) -> list[str]:
    """A log with instance entries: each instance opens with one, and the last one is this key's.

    The earlier instances (zeroized since, in the same TPM boot) only replay into the register;
    the code, configuration and model checked are the current instance's.
    """
    instances = [i for i, e in enumerate(claims.log) if e.kind == INSTANCE_KIND]
    if not instances:
        return []
    problems = [] if instances[0] == 0 else ["measurement log has entries before its first instance"]
    current = claims.log[instances[-1]]
    expected = {
        "public_key_sha256": hashlib.sha256(claims.public_key).hexdigest(),
        "deployment": claims.deployment,
    }
    if hashlib.sha384(canonical_json(dict(current.detail))).digest() != current.sha384:
        problems.append("instance measurement does not match the instance it describes")
    elif dict(current.detail) != expected:
        problems.append("the log's current instance is another key or deployment than the claims'")
    return problems


def _check_code(claims: AttestedClaims, reference: ReferenceValues) -> list[str]:
    problems, digest, _ = _single(claims, "code")
    if digest is not None and digest.hex() != reference.code_sha384:
        problems.append(f"code measurement is {digest.hex()}, manifest expects {reference.code_sha384}")
    return problems


def _check_config(claims: AttestedClaims, reference: ReferenceValues) -> list[str]:
    problems, digest, detail = _single(claims, "config")
    if digest is None:
        return problems
    if hashlib.sha384(canonical_json(detail)).digest() != digest:
        problems.append("config measurement does not match the configuration it describes")
    pinned = detail.get("custodian_ca_sha256")
    if pinned != reference.custodian_ca_sha256:
        problems.append(
            f"enclave pins custodian CA {pinned}, manifest expects {reference.custodian_ca_sha256}"
        )
    return problems


def _check_model(claims: AttestedClaims, reference: ReferenceValues, *, require_model: bool) -> list[str]:
    events = claims.events("model")
    if len(events) > 1:
        return [f"measurement log has {len(events)} model events, expected at most one"]
    if not events:
        return ["enclave has no model loaded"] if require_model else []
    model = events[0].sha384.hex()
    if not reference.allowed_model_sha384:
        return [f"model {model} is loaded but the manifest allows no model"]
    if model not in reference.allowed_model_sha384:
        return [f"model {model} is not among the manifest's allowed models"]
    return []
