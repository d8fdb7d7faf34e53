from __future__ import annotations

import datetime

import pytest
from cryptography.hazmat.primitives import serialization

from enclave import identity
from enclave.attestation import ReferenceValues
from enclave.errors import FormatError, ManifestError

from ._sim_evidence import pinned_registers, reference

GOOD = reference().to_toml()


def test_manifest_round_trip() -> None:
    ref = reference()
    assert ReferenceValues.from_toml(ref.to_toml()) == ref
    assert "SIMULATION ALLOWED" in ref.to_toml()
    tdx = reference(platform="tdx", allow_simulation=False, registers=pinned_registers("tdx"))
    assert "SIMULATION" not in tdx.to_toml()


BAD_MANIFESTS = [
    ("not-toml", "format = ", "not valid TOML"),
    ("wrong-format", GOOD.replace("custos-manifest/1", "other/9"), "format"),
    ("no-platform", GOOD.replace('platform = "sim"\n', ""), "no platform"),
    ("no-code", "\n".join(li for li in GOOD.splitlines() if not li.startswith("code_sha384")), "code_sha384"),
    ("short-code", GOOD.replace(reference().code_sha384, "ab"), "48 bytes"),
    ("non-hex-ca", GOOD.replace(reference().custodian_ca_sha256, "zz" * 32), "not hex"),
    ("bool-as-string", GOOD.replace("allow_simulation = true", 'allow_simulation = "yes"'), "true or false"),
    ("models-not-list", GOOD.replace("allowed_model_sha384 = [", "allowed_model_sha384 = 1 #["), "list"),
    ("huge", GOOD + "#" * 70000, "limit"),
]


@pytest.mark.parametrize(
    ("text", "reason"), [b[1:] for b in BAD_MANIFESTS], ids=[b[0] for b in BAD_MANIFESTS]
)
def test_bad_manifests_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ManifestError, match=reason):
        ReferenceValues.from_toml(text)


def test_with_models_adds_without_duplicates() -> None:
    ref = reference(allowed_model_sha384=())
    assert ref.with_models("aa" * 48, "aa" * 48).allowed_model_sha384 == ("aa" * 48,)


def test_attested_certificate_round_trip() -> None:
    key = identity.generate_identity_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = identity.attested_certificate(key, b"evidence" * 1000, b"claims", now=now)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    _, public, evidence, claims = identity.read_attested_certificate(pem)
    assert (public, evidence, claims) == (identity.public_key_der(key), b"evidence" * 1000, b"claims")


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x30\x00",
        b"\x30\x02\x04\x00",
        b"\x30\x05\x04\x00\x04\x00\x00",
        b"\x30\x84\xff\xff\xff\xff",
        b"\x04\x00",
    ],
    ids=["empty", "empty-seq", "one-field", "trailing-field", "huge-length", "not-a-sequence"],
)
def test_malformed_attestation_extension(value: bytes) -> None:
    with pytest.raises(FormatError):
        identity.decode_attestation(value)


def test_certificate_without_extension_is_refused() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = identity.generate_identity_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(FormatError, match="no attestation extension"):
        identity.read_attested_certificate(cert.public_bytes(serialization.Encoding.PEM))
