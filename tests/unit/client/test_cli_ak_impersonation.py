"""custos-query against an enrolled borrower posing as a tpm enclave (issue 12 §3): exit 3, nothing sent.

The borrower's sim instance holds a software key with a client certificate
from the custodian's enclave CA. Its fake enclave serves tpm evidence quoted
by that key (tests/unit/enclave/_forged_tpm.py), in its TLS certificate and in
its answer to Attest, with the enclave certificate as the AK certificate.
Before the AK CA and the AK checks, ``custos-query`` printed "verified ...
platform tpm" for it and sent the input.
"""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from client.cli import main
from custodian.authority import CertificateAuthority
from enclave import identity
from enclave.attestation import AttestedClaims
from protos import custos_pb2
from testkit.processes import DIGITS_SAMPLES
from tests.unit.client.fake_enclave import Certificate, FakeEnclave, serving
from tests.unit.enclave._forged_tpm import boot_registers, forged_evidence, forged_tpm
from tests.unit.enclave._sim_evidence import reference, sim_enclave

IMAGE = DIGITS_SAMPLES / "digit-3.png"


@pytest.mark.parametrize("encoding", ["tpmt_public", "spki"])
@pytest.mark.parametrize(
    "roots", ["ak-ca", "enclave-ca"], ids=["manifest-today", "manifest-naming-enclave-ca"]
)
def test_enclave_certificate_as_ak_gets_exit_3_and_no_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], encoding: str, roots: str
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    cas = {
        stem: CertificateAuthority.load_or_create(tmp_path, stem, stem, now=now)
        for stem in ("ak-ca", "enclave-ca")
    }
    borrower = sim_enclave(with_model=True)
    # What the custodian gave the borrower's enrolled sim instance: a client certificate for its key.
    stolen = cas["enclave-ca"].issue_client(
        borrower.key.public_key(), "sim-instance", now=now, validity=datetime.timedelta(days=1)
    )
    ak_cert = stolen.public_bytes(serialization.Encoding.PEM)
    claims = replace(borrower.claims, platform="tpm")

    def forged(for_claims: AttestedClaims) -> bytes:
        return forged_evidence(borrower.key, for_claims, ak_encoding=encoding, ak_cert=ak_cert).to_bytes()

    def answer(fake: FakeEnclave, nonce: bytes) -> custos_pb2.AttestResponse:
        fresh = replace(claims, purpose="attest", nonce=nonce)
        return custos_pb2.AttestResponse(evidence=forged(fresh), claims=fresh.to_bytes())

    tls = replace(claims, purpose="tls", nonce=b"")
    certificate = identity.attested_certificate(borrower.key, forged(tls), tls.to_bytes(), now=now)
    manifest = tmp_path / "end-user.toml"
    manifest.write_text(
        reference(
            platform="tpm",
            allow_simulation=False,
            registers=boot_registers(forged_tpm(borrower.key, claims)),
            tpm_ak_roots=cas[roots].pem.decode(),
        ).to_toml()
    )
    fake = FakeEnclave(enclave=borrower, answer=answer)
    served = Certificate(borrower.key, certificate.public_bytes(serialization.Encoding.PEM))
    with serving(fake, served) as address:
        code = main(["--enclave", address, "--manifest", str(manifest), str(IMAGE)])
    captured = capsys.readouterr()
    assert code == 3, captured
    assert "verified" not in captured.out
    assert {"tpmt_public": "extended key usage clientAuth", "spki": "bare spki key"}[encoding] in captured.err
    assert fake.requests == []
