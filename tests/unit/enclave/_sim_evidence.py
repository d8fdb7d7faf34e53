"""Genuine sim evidence for tests: a real SimAttester over a real measurement log."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric import ec

from enclave import identity
from enclave.attestation import AttestedClaims, ReferenceValues
from enclave.attestation.manifest import IDENTITY_REGISTERS
from enclave.attestation.measurement import code_event, code_sha384, config_event, model_event
from enclave.attestation.register_layout import OS_PCR_SETS, register_size
from enclave.attestation.sim import BOOT_MEASUREMENT, SimAttester

CA_DER = b"test custodian ca"
MODEL_SHA384 = hashlib.sha384(b"a model").digest()


@dataclass
class SimEnclave:
    key: ec.EllipticCurvePrivateKey
    attester: SimAttester
    claims: AttestedClaims

    def evidence(self) -> bytes:
        return self.attester.collect(self.claims.report_data()).to_bytes()


def pinned_registers(platform: str) -> dict[str, str]:
    """Zero values for the registers a ``platform`` manifest must pin (``IDENTITY_REGISTERS``, and
    for tpm the classic boot chain of ``OS_PCR_SETS``)."""
    if platform == "tpm":
        return {f"pcr.sha256.{i}": "00" * 32 for i in OS_PCR_SETS["classic"]}
    return {
        names[0]: "00" * (register_size(platform, names[0]) or 0)
        for names in IDENTITY_REGISTERS.get(platform, ())
    }


def reference(**changes: object) -> ReferenceValues:
    ref = ReferenceValues(
        platform="sim",
        allow_simulation=True,
        custodian_ca_sha256=hashlib.sha256(CA_DER).hexdigest(),
        code_sha384=code_sha384().hex(),
        allowed_model_sha384=(MODEL_SHA384.hex(),),
        registers={"sim.boot": BOOT_MEASUREMENT.hex()},
    )
    return replace(ref, **changes)  # type: ignore[arg-type]


def sim_enclave(
    *, purpose: str = "enrol", with_model: bool = False, nonce: bytes | None = None
) -> SimEnclave:
    key = identity.generate_identity_key()
    attester = SimAttester()
    log = [code_event(), config_event(CA_DER)]
    if with_model:
        log.append(model_event(MODEL_SHA384))
    for event in log:
        attester.extend(event.digests())
    claims = AttestedClaims(
        nonce=nonce if nonce is not None else os.urandom(32),
        public_key=identity.public_key_der(key),
        deployment="demo",
        platform="sim",
        purpose=purpose,
        log=tuple(log),
    )
    return SimEnclave(key=key, attester=attester, claims=claims)
