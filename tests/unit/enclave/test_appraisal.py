from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable
from dataclasses import replace

import pytest

from enclave import identity
from enclave.attestation import AttestedClaims, Evidence, appraise
from enclave.attestation.claims import replay
from enclave.attestation.measurement import model_event
from enclave.errors import AttestationError, BindingError, EvidenceError, FormatError, PolicyError

from ._sim_evidence import SimEnclave, pinned_registers, reference, sim_enclave

NOW = datetime.datetime(2026, 11, 21, tzinfo=datetime.UTC)


def _appraise(
    enc: SimEnclave, evidence: bytes | None = None, claims: bytes | None = None, **kw: object
) -> None:
    args: dict[str, object] = {
        "now": NOW,
        "nonce": enc.claims.nonce,
        "public_key": enc.claims.public_key,
        "purpose": enc.claims.purpose,
        "deployment": "demo",
    }
    args.update(kw)
    ref = args.pop("reference", reference())
    appraise(
        evidence if evidence is not None else enc.evidence(),
        claims if claims is not None else enc.claims.to_bytes(),
        ref,  # type: ignore[arg-type]
        **args,  # type: ignore[arg-type]
    )


def test_genuine_sim_evidence_passes_and_is_flagged_simulated() -> None:
    enc = sim_enclave(with_model=True)
    result = appraise(
        enc.evidence(),
        enc.claims.to_bytes(),
        reference(),
        now=NOW,
        nonce=enc.claims.nonce,
        public_key=enc.claims.public_key,
        purpose="enrol",
        require_model=True,
    )
    assert result.simulated
    assert result.model_sha384 == enc.claims.events("model")[0].sha384


def _other_key_claims(enc: SimEnclave) -> dict[str, object]:
    """Claims rewritten for another key, presented with the original evidence."""
    other = identity.public_key_der(identity.generate_identity_key())
    return {"claims": replace(enc.claims, public_key=other).to_bytes(), "public_key": other}


REFUSALS: list[
    tuple[str, Callable[[SimEnclave], dict[str, object]], type[AttestationError | FormatError], str]
] = [
    ("wrong-nonce", lambda e: {"nonce": os.urandom(32)}, BindingError, "nonce"),
    (
        "other-key",
        lambda e: {"public_key": identity.public_key_der(identity.generate_identity_key())},
        BindingError,
        "another public key",
    ),
    ("claims-swapped-for-other-key", _other_key_claims, BindingError, "report data"),
    ("wrong-purpose", lambda e: {"purpose": "attest"}, BindingError, "'enrol'"),
    ("wrong-deployment", lambda e: {"deployment": "other"}, BindingError, "deployment"),
    (
        "tampered-code-value",
        lambda e: {"reference": reference(code_sha384="00" * 48)},
        PolicyError,
        "code measurement",
    ),
    (
        "wrong-custodian-ca",
        lambda e: {"reference": reference(custodian_ca_sha256="11" * 32)},
        PolicyError,
        "custodian CA",
    ),
    (
        "wrong-boot-register",
        lambda e: {"reference": reference(registers={"sim.boot": "22" * 48})},
        PolicyError,
        "sim.boot",
    ),
    (
        "other-platform",
        lambda e: {"reference": reference(platform="tdx", registers=pinned_registers("tdx"))},
        PolicyError,
        "platform",
    ),
    ("model-required", lambda e: {"require_model": True}, PolicyError, "no model"),
    ("garbage-evidence", lambda e: {"evidence": b"\x00garbage"}, EvidenceError, "parse"),
    ("oversized-evidence", lambda e: {"evidence": b" " * (300 * 1024)}, EvidenceError, "limit"),
    ("garbage-claims", lambda e: {"claims": b"{}"}, FormatError, "format"),
]


@pytest.mark.parametrize(("make", "error", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_reason(
    make: Callable[[SimEnclave], dict[str, object]], error: type[Exception], reason: str
) -> None:
    enc = sim_enclave()
    with pytest.raises(error, match=reason):
        _appraise(enc, **make(enc))


def test_policy_reports_every_mismatch_at_once() -> None:
    enc = sim_enclave()
    with pytest.raises(PolicyError) as info:
        _appraise(enc, reference=reference(code_sha384="00" * 48, custodian_ca_sha256="11" * 32))
    assert len(info.value.mismatches) == 2


def test_model_outside_allowed_list_is_refused() -> None:
    enc = sim_enclave(with_model=True)
    with pytest.raises(PolicyError, match="not among"):
        _appraise(enc, reference=reference(allowed_model_sha384=("33" * 48,)))


def test_log_that_does_not_replay_is_refused() -> None:
    enc = sim_enclave()
    # Claims that list an extra model event the registers never saw.
    forged = replace(enc.claims, log=(*enc.claims.log, model_event(hashlib.sha384(b"x").digest())))
    evidence = enc.attester.collect(forged.report_data()).to_bytes()
    with pytest.raises(BindingError, match="replay"):
        _appraise(enc, evidence=evidence, claims=forged.to_bytes())


def test_flipped_signature_byte_is_refused() -> None:
    enc = sim_enclave()
    parsed = Evidence.from_bytes(enc.evidence())
    sig = bytearray(parsed.parts["signature"])
    sig[-1] ^= 1
    tampered = Evidence(platform="sim", parts={**parsed.parts, "signature": bytes(sig)}).to_bytes()
    with pytest.raises(EvidenceError, match="signature"):
        _appraise(enc, evidence=tampered)


def test_claims_must_be_canonical() -> None:
    enc = sim_enclave()
    with pytest.raises(FormatError, match="canonical"):
        AttestedClaims.from_bytes(enc.claims.to_bytes().replace(b",", b", ", 1))


def test_replay_matches_register_folding() -> None:
    enc = sim_enclave(with_model=True)
    register = bytes(48)
    for event in enc.claims.log:
        register = hashlib.sha384(register + event.digest("sha384")).digest()
    assert replay(enc.claims.log, "sha384") == register
