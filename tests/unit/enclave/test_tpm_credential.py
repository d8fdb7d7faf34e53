"""MakeCredential in software and EK certificates (enclave.attestation.tpm_credential).

Checked three ways: byte for byte against tpm2-tools' ``tpm2_makecredential``
(an independent implementation, run offline with ``-T none``; one recorded
vector, the rest live), by a real TPM's ``TPM2_ActivateCredential`` (swtpm,
see tests/tpm_support.py), and the EK certificate that swtpm_setup had a local
CA issue against that CA and against one it did not come from.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from enclave._daemon.errors import TpmDeviceError
from enclave._daemon.tpm_device import TpmAttester
from enclave.attestation.tpm_credential import (
    EkParameters,
    _credential_blob,
    _kdfe,
    ek_parameters,
    load_ek_certificate,
    make_credential,
    object_name,
    verify_ek_certificate,
)
from enclave.attestation.tpm_structures import parse_public
from enclave.errors import EvidenceError
from tests import tpm_support

start_swtpm = tpm_support.swtpm_fixture()
open_attester = tpm_support.attester_fixture()

OpenAttester = Callable[..., TpmAttester]
AK_NAME = b"\x00\x0b" + hashlib.sha256(b"an attestation key").digest()
SECRET = hashlib.sha256(b"a credential secret").digest()

# Recorded with tpm2-tools 5.4 (Debian tpm2-tools 5.4-1), offline:
#   tpm2_makecredential -Q -T none -G ecc -u kat.pem -s kat.sec -n <KAT_NAME hex> -o kat.out
# kat.pem: the P-256 public key of scalar SHA-256("custos tpm_credential KAT EK"); kat.sec:
# SHA-256("custos tpm_credential KAT secret"); KAT_NAME: 0x000b || SHA-256("custos tpm_credential KAT AK").
# kat.out: tpm2-tools' credential file, magic 0xbadcc0de, version 1, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
KAT_EK_SCALAR = int.from_bytes(hashlib.sha256(b"custos tpm_credential KAT EK").digest(), "big")
KAT_SECRET = hashlib.sha256(b"custos tpm_credential KAT secret").digest()
KAT_NAME = b"\x00\x0b" + hashlib.sha256(b"custos tpm_credential KAT AK").digest()
KAT_OUT = bytes.fromhex(
    "badcc0de000000010044002070438b64a86d9e7f2e0a46e66295b95c34cd3e59fc3a6b6437aee2b5793f50c35f2a4fc6e7"
    "736991afe8fe4fa9f91341c01e227dcc7bbf6b6a0d02c2bf6ddf9ecf1400440020f9eaef40d421ed5f048333f013aed1b5"
    "0a9b1cf806cb609a79e6870bb453cdac0020101c5d744fdebf16d50b94806eac2194d4fabb9f1df15972ba3a5a54a4354c51"
)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _tools_file(data: bytes) -> tuple[bytes, bytes]:
    """tpm2-tools' credential file: (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET), both with their sizes."""
    assert data[:8] == bytes.fromhex("badcc0de00000001")
    size = int.from_bytes(data[8:10], "big")
    return data[8 : 10 + size], data[10 + size :]


def _open_seed(private: PrivateKey, encrypted_secret: bytes) -> bytes:
    """What the TPM does with its EK private key in ActivateCredential: recover the seed."""
    body = encrypted_secret[2:]
    assert int.from_bytes(encrypted_secret[:2], "big") == len(body)
    if isinstance(private, rsa.RSAPrivateKey):
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\0")
        return private.decrypt(body, oaep)
    x_size = int.from_bytes(body[:2], "big")
    x = body[2 : 2 + x_size]
    y = body[4 + x_size :]
    ephemeral = ec.EllipticCurvePublicNumbers(
        int.from_bytes(x, "big"), int.from_bytes(y, "big"), private.curve
    ).public_key()
    z = private.exchange(ec.ECDH(), ephemeral)
    ek_x = private.public_key().public_numbers().x.to_bytes(32, "big")
    return _kdfe("sha256", z, b"IDENTITY\0", x, ek_x, 256)


def _software_ek(kind: str) -> PrivateKey:
    return rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())


# --- against tpm2-tools ---


def test_recorded_tpm2_tools_vector() -> None:
    private = ec.derive_private_key(KAT_EK_SCALAR, ec.SECP256R1())
    blob, encrypted_secret = _tools_file(KAT_OUT)
    seed = _open_seed(private, encrypted_secret)
    ek = ek_parameters(private.public_key())
    assert _credential_blob(ek, KAT_NAME, KAT_SECRET, seed) == blob


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_same_credential_as_tpm2_makecredential(kind: str, tmp_path: Path) -> None:
    tpm_support.require_tpm2_tools()
    private = _software_ek(kind)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "ek.pem").write_bytes(pem)
    (tmp_path / "secret").write_bytes(SECRET)
    subprocess.run(
        [
            *("tpm2_makecredential", "-Q", "-T", "none", "-G", kind, "-u", str(tmp_path / "ek.pem")),
            *("-s", str(tmp_path / "secret"), "-n", AK_NAME.hex(), "-o", str(tmp_path / "out")),
        ],
        check=True,
        capture_output=True,
    )
    blob, encrypted_secret = _tools_file((tmp_path / "out").read_bytes())
    # The seed is random, so take tpm2-tools' seed (as the TPM would) and derive the rest ourselves.
    seed = _open_seed(private, encrypted_secret)
    assert _credential_blob(ek_parameters(private.public_key()), AK_NAME, SECRET, seed) == blob


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_our_seed_opens_as_a_tpm_opens_it(kind: str) -> None:
    private = _software_ek(kind)
    blob, encrypted_secret = make_credential(private.public_key(), AK_NAME, SECRET)
    seed = _open_seed(private, encrypted_secret)
    assert len(seed) == 32
    assert _credential_blob(ek_parameters(private.public_key()), AK_NAME, SECRET, seed) == blob
    assert len(blob) == 2 + (2 + 32) + (2 + len(SECRET))


# --- against a TPM's ActivateCredential ---


@pytest.mark.parametrize("key_type", ["rsa", "ecc"])
def test_activate_credential_returns_the_secret(open_attester: OpenAttester, key_type: str) -> None:
    attester = open_attester(key_type=key_type)
    assert attester.ak_name == object_name(attester.ak_public)
    blob, encrypted_secret = make_credential(attester.ek_public, attester.ak_name, SECRET)
    assert attester.activate_credential(blob, encrypted_secret) == SECRET
    short = b"sixteen byte key"
    assert (
        attester.activate_credential(*make_credential(attester.ek_public, attester.ak_name, short)) == short
    )


def test_ek_as_a_bare_key(open_attester: OpenAttester) -> None:
    attester = open_attester()
    key = parse_public(attester.ek_public).public_key()
    blob, encrypted_secret = make_credential(key, attester.ak_name, SECRET)
    assert attester.activate_credential(blob, encrypted_secret) == SECRET


def test_ak_of_another_tpm_cannot_activate(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    ours, theirs = open_attester(), open_attester(start_swtpm("blank"))
    assert ours.ak_name != theirs.ak_name
    blob, encrypted_secret = make_credential(ours.ek_public, theirs.ak_name, SECRET)
    with pytest.raises(TpmDeviceError, match="ActivateCredential refused the credential"):
        ours.activate_credential(blob, encrypted_secret)
    blob, encrypted_secret = make_credential(theirs.ek_public, ours.ak_name, SECRET)
    with pytest.raises(TpmDeviceError, match="ActivateCredential refused the credential"):
        ours.activate_credential(blob, encrypted_secret)


def test_another_ak_of_the_same_tpm_cannot_activate(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    tpm = start_swtpm()
    other = open_attester(tpm, key_type="ecc")
    other_ak_name = other.ak_name
    other.close()  # swtpm serves one connection at a time
    attester = open_attester(tpm)
    blob, encrypted_secret = make_credential(attester.ek_public, other_ak_name, SECRET)
    with pytest.raises(TpmDeviceError, match="ActivateCredential refused the credential"):
        attester.activate_credential(blob, encrypted_secret)


def test_any_flipped_byte_of_the_credential_is_refused(open_attester: OpenAttester) -> None:
    attester = open_attester(key_type="ecc")
    blob, encrypted_secret = make_credential(attester.ek_public, attester.ak_name, SECRET)
    for index in range(2, len(blob)):  # past the size: a wrong size does not parse
        flipped = bytearray(blob)
        flipped[index] ^= 0x01
        with pytest.raises(TpmDeviceError, match=r"refused|does not parse"):
            attester.activate_credential(bytes(flipped), encrypted_secret)
    for index in (2, 20, 40, len(encrypted_secret) - 1):
        flipped = bytearray(encrypted_secret)
        flipped[index] ^= 0x01
        with pytest.raises(TpmDeviceError, match="refused"):
            attester.activate_credential(blob, bytes(flipped))


@pytest.mark.parametrize(
    ("blob", "secret", "reason"),
    [
        pytest.param(b"\x00", None, "credential blob does not parse", id="blob-truncated"),
        pytest.param(None, b"\x00\x05abc", "encrypted secret does not parse", id="secret-truncated"),
        pytest.param(b"\x00\x01a\x00", None, "credential blob has 1 trailing bytes", id="blob-trailing"),
    ],
)
def test_malformed_credential_is_refused(
    open_attester: OpenAttester, blob: bytes | None, secret: bytes | None, reason: str
) -> None:
    attester = open_attester()
    good_blob, good_secret = make_credential(attester.ek_public, attester.ak_name, SECRET)
    with pytest.raises(TpmDeviceError, match=reason):
        attester.activate_credential(blob or good_blob, secret or good_secret)


# --- EK certificates ---


def _other_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swtpm-localca")])  # same name, other key
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def test_ek_certificate_chains_to_the_local_ca(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    attester = open_attester()
    assert attester.ek_certificate is not None
    ca = start_swtpm.ca
    chain = verify_ek_certificate(
        attester.ek_certificate,
        attester.ek_public,
        roots=ca.roots(),
        intermediates=ca.intermediates(),
        now=datetime.now(UTC),
    )
    assert [c.public_bytes(serialization.Encoding.DER) for c in chain[1:]] == [
        ca.intermediates()[0].public_bytes(serialization.Encoding.DER),
        ca.roots()[0].public_bytes(serialization.Encoding.DER),
    ]
    # The certificate certifies the key the TPM re-creates from the EK template.
    assert (
        load_ek_certificate(attester.ek_certificate).public_key()
        == parse_public(attester.ek_public).public_key()
    )


def _other_root(ca: tpm_support.TpmCa, cert: bytes, ek: bytes) -> dict[str, Any]:
    return {"roots": [_other_ca()[0]], "intermediates": ca.intermediates()}


def _missing_intermediate(ca: tpm_support.TpmCa, cert: bytes, ek: bytes) -> dict[str, Any]:
    return {"roots": ca.roots(), "intermediates": []}


def _another_ek(ca: tpm_support.TpmCa, cert: bytes, ek: bytes) -> dict[str, Any]:
    return {"ek_public": _rsa_2048()}


def _before_validity(ca: tpm_support.TpmCa, cert: bytes, ek: bytes) -> dict[str, Any]:
    return {"now": load_ek_certificate(cert).not_valid_before_utc - timedelta(seconds=1)}


def _no_roots(ca: tpm_support.TpmCa, cert: bytes, ek: bytes) -> dict[str, Any]:
    return {"roots": []}


def _not_a_certificate(ca: tpm_support.TpmCa, cert: bytes, ek: bytes) -> dict[str, Any]:
    return {"ek_cert": cert[: len(cert) // 2]}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param(_other_root, "EK certificate chain stops at sha256:", id="other-ca"),
        pytest.param(_missing_intermediate, "chain stops", id="missing-intermediate"),
        pytest.param(_another_ek, "EK certificate is for another key", id="another-ek"),
        pytest.param(_before_validity, "EK certificate is not valid at", id="not-yet-valid"),
        pytest.param(_no_roots, "no EK certificate roots", id="no-roots"),
        pytest.param(_not_a_certificate, "does not parse as X.509", id="truncated"),
    ],
)
def test_ek_certificate_refused(
    start_swtpm: tpm_support.StartSwtpm,
    open_attester: OpenAttester,
    change: Callable[[tpm_support.TpmCa, bytes, bytes], dict[str, Any]],
    reason: str,
) -> None:
    attester = open_attester()
    assert attester.ek_certificate is not None
    ca = start_swtpm.ca
    arguments: dict[str, Any] = {
        "ek_cert": attester.ek_certificate,
        "ek_public": attester.ek_public,
        "roots": ca.roots(),
        "intermediates": ca.intermediates(),
        "now": datetime.now(UTC),
    }
    arguments.update(change(ca, attester.ek_certificate, attester.ek_public))
    with pytest.raises(EvidenceError, match=reason):
        verify_ek_certificate(**arguments)


def test_ek_certificate_in_nv_padding_and_pem(open_attester: OpenAttester) -> None:
    attester = open_attester()
    assert attester.ek_certificate is not None
    certificate = load_ek_certificate(attester.ek_certificate)
    der = certificate.public_bytes(serialization.Encoding.DER)
    assert load_ek_certificate(der + bytes(300)) == certificate
    assert load_ek_certificate(certificate.public_bytes(serialization.Encoding.PEM)) == certificate


def test_ecc_p256_ek_has_no_certificate_on_swtpm(open_attester: OpenAttester) -> None:
    # swtpm_setup certifies an RSA-2048 EK (0x01c00002) and a P-384 high-range one (0x01c00016),
    # not the P-256 low-range EK whose certificate would be at 0x01c0000a.
    assert open_attester(key_type="ecc").ek_certificate is None


# --- inputs ---


def _tpmt_public(
    key: rsa.RSAPublicKey,
    *,
    attributes: int = 0x000300B2,
    name_alg: int = 0x000B,
    symmetric: bytes | None = None,
) -> bytes:
    """An RSA TPMT_PUBLIC like the TCG EK template L-1 (attributes, AES-128-CFB), for a software key."""
    policy = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
    sym = symmetric if symmetric is not None else bytes.fromhex("000600800043")
    modulus = key.public_numbers().n.to_bytes(key.key_size // 8, "big")
    return (
        (0x0001).to_bytes(2, "big")
        + name_alg.to_bytes(2, "big")
        + attributes.to_bytes(4, "big")
        + len(policy).to_bytes(2, "big")
        + policy
        + sym
        + (0x0010).to_bytes(2, "big")  # scheme: null
        + key.key_size.to_bytes(2, "big")
        + bytes(4)  # exponent: default
        + len(modulus).to_bytes(2, "big")
        + modulus
    )


def test_tpmt_public_ek_matches_the_bare_key() -> None:
    private = rsa.generate_private_key(65537, 2048)
    ek = ek_parameters(_tpmt_public(private.public_key()))
    assert ek == EkParameters(key=ek.key, name_hash="sha256", aes_key_bits=128)
    blob, encrypted_secret = make_credential(_tpmt_public(private.public_key()), AK_NAME, SECRET)
    seed = _open_seed(private, encrypted_secret)
    assert _credential_blob(ek, AK_NAME, SECRET, seed) == blob


@functools.cache
def _rsa_2048() -> rsa.RSAPublicKey:
    return rsa.generate_private_key(65537, 2048).public_key()


@pytest.mark.parametrize(
    ("ek_public", "reason"),
    [
        pytest.param(
            lambda: _tpmt_public(_rsa_2048(), attributes=0x00050072),
            "not those of a restricted decryption key",
            id="ak",
        ),
        pytest.param(
            lambda: _tpmt_public(_rsa_2048(), attributes=0x000700B2),
            "EK is a signing key",
            id="sign-and-decrypt",
        ),
        pytest.param(
            lambda: _tpmt_public(_rsa_2048(), name_alg=0x0004), r"nameAlg 0x0004 \(sha1\)", id="sha1-name"
        ),
        pytest.param(
            lambda: _tpmt_public(_rsa_2048(), symmetric=bytes.fromhex("0010")),
            "is not AES-CFB",
            id="no-symmetric",
        ),
        pytest.param(
            lambda: _tpmt_public(_rsa_2048(), symmetric=bytes.fromhex("000600800044")),
            "is not AES-CFB",
            id="aes-ofb",
        ),
        pytest.param(
            lambda: rsa.generate_private_key(65537, 1024).public_key(), "must be RSA-2048", id="bare-rsa-1024"
        ),
        pytest.param(
            lambda: ec.generate_private_key(ec.SECP384R1()).public_key(), "must be P-256", id="bare-p384"
        ),
        pytest.param(lambda: b"\x00\x01", "truncated", id="truncated"),
    ],
)
def test_make_credential_refuses_an_unusable_ek(ek_public: Callable[[], Any], reason: str) -> None:
    key = ek_public()
    with pytest.raises(EvidenceError, match=reason):
        make_credential(key, AK_NAME, SECRET)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        pytest.param(b"", "does not start with", id="empty"),
        pytest.param(b"\x00\x04" + bytes(20), "does not start with", id="sha1-name"),
        pytest.param(b"\x00\x0b" + bytes(31), "a sha256 Name has 34", id="short"),
        pytest.param(b"\x00\x0c" + bytes(32), "a sha384 Name has 50", id="wrong-length"),
    ],
)
def test_make_credential_refuses_a_bad_name(name: bytes, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        make_credential(_rsa_2048(), name, SECRET)


@pytest.mark.parametrize("secret", [b"", bytes(33)], ids=["empty", "longer-than-the-digest"])
def test_make_credential_refuses_a_bad_secret(secret: bytes) -> None:
    with pytest.raises(ValueError, match="a credential secret is 1 to 32 bytes"):
        make_credential(_rsa_2048(), AK_NAME, secret)


def test_secret_bytes_are_fresh() -> None:
    first = make_credential(_rsa_2048(), AK_NAME, SECRET)
    second = make_credential(_rsa_2048(), AK_NAME, SECRET)
    assert first[0] != second[0]
    assert first[1] != second[1]
