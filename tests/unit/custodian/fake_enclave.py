"""A fake enclave for the custodian's tests: the enclave side of enrolment, from the real public modules.

It attests on the ``sim`` platform (``enclave.attestation.sim``), measures the
real enclave code and the custodian CA it pins, and builds enrolment requests
the way the daemon does; knobs let tests build the wrong ones on purpose.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave.attestation import AttestedClaims, MeasurementEvent, ReferenceValues
from enclave.attestation.measurement import code_event, config_event
from enclave.attestation.sim import BOOT_MEASUREMENT, BOOT_REGISTER, SimAttester
from enclave.identity import generate_identity_key, private_key_pem, public_key_der
from enclave.receipts import GENESIS, Receipt, SignedReceipt, sign_receipt
from protos import custos_pb2 as pb


@functools.cache
def _code_event() -> MeasurementEvent:
    """The real enclave build's code measurement (hashing the sources once per test run)."""
    return code_event()


def ca_der(ca_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(ca_pem).public_bytes(serialization.Encoding.DER)


def sim_manifest(
    custodian_ca_pem: bytes, *, allow_simulation: bool = True, code_sha384: str | None = None
) -> str:
    """The manifest `enclave manifest` would write for this build on the sim platform."""
    return ReferenceValues(
        platform="sim",
        allow_simulation=allow_simulation,
        custodian_ca_sha256=hashlib.sha256(ca_der(custodian_ca_pem)).hexdigest(),
        code_sha384=code_sha384 or _code_event().sha384.hex(),
        registers={BOOT_REGISTER: BOOT_MEASUREMENT.hex()},
    ).to_toml()


def csr_der(key: ec.EllipticCurvePrivateKey, *, signer: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    """A CSR for ``key``; signed by ``signer`` instead, its signature does not verify."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclave")])
    )
    csr = builder.sign(key, hashes.SHA256())
    der = csr.public_bytes(serialization.Encoding.DER)
    if signer is None:
        return der
    # Re-sign the same request body with another key: the embedded public key no longer matches.
    forged = builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    other_spki = public_key_der(signer)
    return forged.replace(other_spki, public_key_der(key))


@dataclass
class FakeEnclave:
    custodian_ca_pem: bytes
    deployment: str
    key: ec.EllipticCurvePrivateKey = field(default_factory=generate_identity_key)
    attester: SimAttester = field(default_factory=SimAttester)
    # Set once enrolled; the receipt chain the enclave keeps.
    instance_id: str = ""
    model_sha384: bytes = bytes(48)
    last_seq: int = 0
    head: bytes = GENESIS

    def __post_init__(self) -> None:
        self.log = (_code_event(), config_event(ca_der(self.custodian_ca_pem)))
        for event in self.log:
            self.attester.extend(event.digests())

    @property
    def public_key(self) -> bytes:
        return public_key_der(self.key)

    @property
    def key_pem(self) -> bytes:
        return private_key_pem(self.key)

    def claims(self, nonce: bytes, **changes: object) -> AttestedClaims:
        values: dict[str, object] = {
            "nonce": nonce,
            "public_key": self.public_key,
            "deployment": self.deployment,
            "platform": "sim",
            "purpose": "enrol",
            "log": self.log,
        }
        values.update(changes)
        return AttestedClaims(**values)  # type: ignore[arg-type]

    def enrol_request(
        self,
        nonce: bytes,
        token: str,
        *,
        claims: AttestedClaims | None = None,
        csr: bytes | None = None,
        evidence: bytes | None = None,
        deployment: str | None = None,
    ) -> pb.EnrolRequest:
        claims = claims or self.claims(nonce)
        return pb.EnrolRequest(
            deployment=deployment or self.deployment,
            join_token=token,
            evidence=evidence
            if evidence is not None
            else self.attester.collect(claims.report_data()).to_bytes(),
            claims=claims.to_bytes(),
            csr=csr if csr is not None else csr_der(self.key),
        )

    def receipt(self, lease_id: str, used: int, **changes: object) -> tuple[Receipt, SignedReceipt]:
        """The next receipt of this enclave's chain (not yet accepted); ``changes`` forge its fields.

        ``key=`` signs it with another key instead of the enclave's own.
        """
        key = changes.pop("key", self.key)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        values: dict[str, object] = {
            "deployment": self.deployment,
            "instance": self.instance_id,
            "lease": lease_id,
            "model_sha384": self.model_sha384,
            "used": used,
            "seq": self.last_seq + 1,
            "prev": self.head,
        }
        values.update(changes)
        receipt = Receipt(**values)  # type: ignore[arg-type]
        return receipt, sign_receipt(receipt, key)

    def accepted(self, receipt: Receipt) -> None:
        """The custodian took ``receipt``: the chain moves on."""
        self.last_seq, self.head = receipt.seq, receipt.digest()
