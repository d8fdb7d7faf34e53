"""A software TPM for tests: TPM 2.0 structures marshalled by hand, quotes signed by generated AKs.

The helpers here (imported by the other test_tpm_* modules) build what real
samples cannot provide: every signature scheme and AK encoding, multi-bank
selections, chosen PCR values. The tests here check that the parsers read
back what was marshalled, and refuse malformed structures naming the field.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from enclave.attestation.interface import Evidence
from enclave.attestation.tpm import parse_pcr_values, qualifying_data
from enclave.attestation.tpm_ak import load_ak
from enclave.attestation.tpm_structures import ClockInfo, parse_attest, parse_public, parse_signature
from enclave.errors import EvidenceError

NOW = datetime.datetime(2026, 11, 21, tzinfo=datetime.UTC)
ALG = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D, "null": 0x0010}
RSASSA, RSAPSS, ECDSA = 0x0014, 0x0016, 0x0018
HASHES = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384()}
# fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | restricted | sign
AK_ATTRIBUTES = 0x00050072
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# --- marshalling (TPM 2.0 Part 2, big-endian) ---


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def tpm2b(data: bytes) -> bytes:
    return u16(len(data)) + data


def marshal_selection(selection: Sequence[tuple[str, Sequence[int]]], size: int = 3) -> bytes:
    out = u32(len(selection))
    for bank, pcrs in selection:
        bitmap = bytearray(size)
        for i in pcrs:
            bitmap[i // 8] |= 1 << (i % 8)
        out += u16(ALG[bank]) + bytes([size]) + bytes(bitmap)
    return out


def marshal_attest(
    *,
    extra_data: bytes,
    selection: Sequence[tuple[str, Sequence[int]]],
    pcr_digest: bytes,
    magic: int = 0xFF544347,
    kind: int = 0x8018,
    qualified_signer: bytes = u16(0x000B) + bytes(32),
    clock: int = 987654321,
    reset_count: int = 4,
    restart_count: int = 1,
    safe: int = 1,
    firmware: int = 0x2024010100010002,
    raw_selection: bytes | None = None,
) -> bytes:
    return (
        u32(magic)
        + u16(kind)
        + tpm2b(qualified_signer)
        + tpm2b(extra_data)
        + clock.to_bytes(8, "big")
        + u32(reset_count)
        + u32(restart_count)
        + bytes([safe])
        + firmware.to_bytes(8, "big")
        + (marshal_selection(selection) if raw_selection is None else raw_selection)
        + tpm2b(pcr_digest)
    )


def marshal_public(
    key: PrivateKey,
    *,
    attributes: int = AK_ATTRIBUTES,
    scheme: int | None = None,
    scheme_hash: str = "sha256",
) -> bytes:
    """An AK's TPMT_PUBLIC: nameAlg sha256, empty authPolicy, no symmetric, the given scheme."""
    head = u16(0x0023 if isinstance(key, ec.EllipticCurvePrivateKey) else 0x0001) + u16(ALG["sha256"])
    head += u32(attributes) + tpm2b(b"") + u16(ALG["null"])
    scheme_bytes = u16(ALG["null"]) if scheme is None else u16(scheme) + u16(ALG[scheme_hash])
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        modulus = numbers.n.to_bytes(key.key_size // 8, "big")
        return head + scheme_bytes + u16(key.key_size) + u32(0) + tpm2b(modulus)
    point = key.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    curve = {"secp256r1": 0x0003, "secp384r1": 0x0004}[key.curve.name]
    return (
        head
        + scheme_bytes
        + u16(curve)
        + u16(ALG["null"])
        + tpm2b(point.x.to_bytes(size, "big"))
        + tpm2b(point.y.to_bytes(size, "big"))
    )


def sign_tpmt(key: PrivateKey, scheme: int, hash_name: str, message: bytes) -> bytes:
    """A TPMT_SIGNATURE over ``message``, as a TPM would produce it."""
    algorithm = HASHES[hash_name]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(message, ec.ECDSA(algorithm)))
        size = (key.curve.key_size + 7) // 8
        return (
            u16(ECDSA) + u16(ALG[hash_name]) + tpm2b(r.to_bytes(size, "big")) + tpm2b(s.to_bytes(size, "big"))
        )
    pad: padding.AsymmetricPadding = padding.PKCS1v15()
    if scheme == RSAPSS:
        pad = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
    return u16(scheme) + u16(ALG[hash_name]) + tpm2b(key.sign(message, pad, algorithm))


def spki(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(key: PrivateKey) -> bytes:
    def b64(value: int, size: int) -> str:
        return base64.urlsafe_b64encode(value.to_bytes(size, "big")).rstrip(b"=").decode()

    if isinstance(key, rsa.RSAPrivateKey):
        n = key.public_key().public_numbers()
        return json.dumps({"kty": "RSA", "n": b64(n.n, key.key_size // 8), "e": b64(n.e, 3)}).encode()
    p = key.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[key.curve.name]
    return json.dumps({"kty": "EC", "crv": crv, "x": b64(p.x, size), "y": b64(p.y, size)}).encode()


def pcr_json(pcrs: Mapping[str, Mapping[int, bytes]]) -> bytes:
    return json.dumps({b: {str(i): v.hex() for i, v in vs.items()} for b, vs in pcrs.items()}).encode()


@dataclass
class SoftwareTpm:
    """PCR banks that extend like a TPM's, and an AK that signs quotes over them."""

    key: PrivateKey
    scheme: int
    hash_name: str = "sha256"
    banks: dict[str, list[bytes]] = field(
        default_factory=lambda: {b: [bytes(hashlib.new(b).digest_size)] * 24 for b in ("sha256", "sha384")}
    )

    def extend(self, bank: str, index: int, digest: bytes) -> None:
        self.banks[bank][index] = hashlib.new(bank, self.banks[bank][index] + digest).digest()

    def values(self, selection: Sequence[tuple[str, Sequence[int]]]) -> dict[str, dict[int, bytes]]:
        return {bank: {i: self.banks[bank][i] for i in pcrs} for bank, pcrs in selection}

    def quote(
        self, nonce: bytes, selection: Sequence[tuple[str, Sequence[int]]], **attest: Any
    ) -> tuple[bytes, bytes]:
        digest = hashlib.new(self.hash_name)
        for bank, pcrs in selection:
            for i in sorted(pcrs):
                digest.update(self.banks[bank][i])
        message = marshal_attest(extra_data=nonce, selection=selection, pcr_digest=digest.digest(), **attest)
        return message, sign_tpmt(self.key, self.scheme, self.hash_name, message)

    def ak(self) -> bytes:
        return marshal_public(self.key, scheme=self.scheme, scheme_hash=self.hash_name)

    def evidence(
        self, report_data: bytes, selection: Sequence[tuple[str, Sequence[int]]], **parts: bytes
    ) -> Evidence:
        # As TpmAttester does: the TPM is qualified with the report data's SHA-256.
        message, signature = self.quote(qualifying_data(report_data), selection)
        base = {
            "quote": message,
            "signature": signature,
            "ak": self.ak(),
            "pcrs": pcr_json(self.values(selection)),
        }
        return Evidence(platform="tpm", parts={**base, **parts})


@functools.cache
def software_keys() -> dict[str, PrivateKey]:
    """Generated once per test run: an RSA-2048, a P-256 and a P-384 AK."""
    return {
        "rsa": rsa.generate_private_key(65537, 2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
    }


SCHEMES = {
    "rsassa-sha256": ("rsa", RSASSA, "sha256"),
    "rsapss-sha256": ("rsa", RSAPSS, "sha256"),
    "rsassa-sha384": ("rsa", RSASSA, "sha384"),
    "ecdsa-p256-sha256": ("p256", ECDSA, "sha256"),
    "ecdsa-p384-sha384": ("p384", ECDSA, "sha384"),
}
AK_ENCODINGS: dict[str, Callable[[SoftwareTpm], bytes]] = {
    "tpmt_public": SoftwareTpm.ak,
    "spki": lambda t: spki(t.key),
    "pem": lambda t: t.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ),
    "jwk": lambda t: jwk(t.key),
}
SELECTION = [("sha256", list(range(24))), ("sha384", [0, 7, 15])]


def tpm_for(scheme: str = "ecdsa-p256-sha256") -> SoftwareTpm:
    key, alg, hash_name = SCHEMES[scheme]
    tpm = SoftwareTpm(software_keys()[key], alg, hash_name)
    tpm.extend("sha256", 0, hashlib.sha256(b"firmware").digest())
    tpm.extend("sha384", 0, hashlib.sha384(b"firmware").digest())
    return tpm


REPORT_DATA = hashlib.sha512(b"report").digest()


def replace_parts(evidence: Evidence, **parts: bytes) -> Evidence:
    return Evidence(platform=evidence.platform, parts={**evidence.parts, **parts})


def without(evidence: Evidence, name: str) -> Evidence:
    return Evidence(platform=evidence.platform, parts={k: v for k, v in evidence.parts.items() if k != name})


# --- what is marshalled parses back ---


def test_marshalled_attest_parses_back() -> None:
    raw = marshal_attest(
        extra_data=b"nonce",
        selection=[("sha256", [0, 15, 23]), ("sha1", [7])],
        pcr_digest=bytes(range(32)),
        clock=5,
        reset_count=6,
        restart_count=7,
        safe=0,
        firmware=0x1122334455667788,
    )
    attest = parse_attest(raw)
    assert attest.raw == raw
    assert attest.extra_data == b"nonce"
    assert attest.clock_info == ClockInfo(clock=5, reset_count=6, restart_count=7, safe=False)
    assert attest.firmware_version == 0x1122334455667788
    assert [(s.bank, s.pcrs) for s in attest.pcr_selection] == [("sha256", (0, 15, 23)), ("sha1", (7,))]
    assert attest.pcr_digest == bytes(range(32))
    assert attest.to_dict()["pcr_selection"] == {"sha256": [0, 15, 23], "sha1": [7]}


@pytest.mark.parametrize("name", ["rsa", "p256", "p384"])
def test_marshalled_public_gives_back_the_key(name: str) -> None:
    key = software_keys()[name]
    ak = load_ak(marshal_public(key))
    assert ak.encoding == "tpmt_public"
    assert ak.spki() == spki(key)
    assert ak.tpm_public is not None
    assert ak.tpm_public.name == u16(0x000B) + hashlib.sha256(marshal_public(key)).digest()
    assert load_ak(jwk(key)).spki() == spki(key)


# --- malformed structures, each naming its field ---

GOOD_ATTEST = {"extra_data": b"nonce", "selection": [("sha256", [0])], "pcr_digest": bytes(32)}


def _attest(**changes: Any) -> bytes:
    return marshal_attest(**{**GOOD_ATTEST, **changes})


ATTEST_REFUSALS: list[tuple[str, bytes, str]] = [
    ("bad-magic", _attest(magic=0xFF544348), "magic"),
    ("not-a-quote", _attest(kind=0x8017), "not a quote"),
    ("truncated", _attest()[:40], "truncated in"),
    ("trailing-byte", _attest() + b"\x00", "trailing"),
    ("oversized", _attest() + bytes(2000), "limit"),
    ("extra-data-too-long", _attest(extra_data=bytes(67)), "extraData is 67 bytes"),
    ("safe-not-boolean", _attest(safe=2), "safe"),
    ("unsupported-bank", _attest(raw_selection=bytes.fromhex("00000001 0012 03 010000")), "0x0012"),
    ("duplicate-bank", _attest(selection=[("sha256", [0]), ("sha256", [1])]), "twice"),
    ("too-many-banks", _attest(raw_selection=u32(17)), "count is 17"),
    ("select-too-large", _attest(raw_selection=bytes.fromhex("00000001 000b 09") + bytes(9)), "sizeofSelect"),
]


@pytest.mark.parametrize(
    ("data", "reason"), [r[1:] for r in ATTEST_REFUSALS], ids=[r[0] for r in ATTEST_REFUSALS]
)
def test_malformed_attest_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        parse_attest(data)


SIGNATURE_REFUSALS: list[tuple[str, bytes, str]] = [
    ("hmac", u16(0x0005) + u16(0x000B) + bytes(32), "not RSASSA"),
    ("null", u16(0x0010), "not RSASSA"),
    ("truncated-rsa", u16(RSASSA) + u16(0x000B) + u16(256) + bytes(10), "truncated in sig"),
    ("truncated-ecdsa-s", u16(ECDSA) + u16(0x000B) + tpm2b(bytes(32)) + u16(32), "signatureS"),
    ("oversized-r", u16(ECDSA) + u16(0x000B) + tpm2b(bytes(70)) + tpm2b(bytes(32)), "signatureR is 70"),
    ("trailing", u16(RSASSA) + u16(0x000B) + tpm2b(bytes(256)) + b"\x00", "trailing"),
]


@pytest.mark.parametrize(
    ("data", "reason"), [r[1:] for r in SIGNATURE_REFUSALS], ids=[r[0] for r in SIGNATURE_REFUSALS]
)
def test_malformed_signature_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        parse_signature(data)


_EC_KEY = ec.generate_private_key(ec.SECP256R1())
_GOOD_PUBLIC = marshal_public(_EC_KEY)
PUBLIC_REFUSALS: list[tuple[str, bytes, str]] = [
    ("keyedhash", u16(0x0008) + _GOOD_PUBLIC[2:], "not an RSA or ECC key"),
    ("p521-curve", _GOOD_PUBLIC[:-72] + u16(0x0005) + _GOOD_PUBLIC[-70:], "curveID 0x0005"),
    ("point-off-curve", _GOOD_PUBLIC[:-1] + bytes([_GOOD_PUBLIC[-1] ^ 1]), "not on its curve"),
    ("truncated", _GOOD_PUBLIC[:-5], "truncated in unique.ecc.y"),
    ("trailing", _GOOD_PUBLIC + b"\x00", "trailing"),
]


@pytest.mark.parametrize(
    ("data", "reason"), [r[1:] for r in PUBLIC_REFUSALS], ids=[r[0] for r in PUBLIC_REFUSALS]
)
def test_malformed_public_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        parse_public(data).public_key()


def test_public_parses_rsa_and_tpm2b_public() -> None:
    raw = marshal_public(software_keys()["rsa"], scheme=RSASSA)
    public = parse_public(raw)
    assert public.rsa_modulus
    assert public.scheme == RSASSA
    assert public.name[:2] == u16(0x000B)
    assert parse_public(tpm2b(raw)) == replace(public)
    with pytest.raises(EvidenceError, match="keyBits"):
        parse_public(raw[:-264] + u16(1024) + raw[-262:])


PCR_REFUSALS: list[tuple[str, bytes, str]] = [
    ("not-object", b"[]", "not a JSON object"),
    ("not-json", b"{", "not JSON"),
    ("unknown-bank", b'{"md5": {}}', "bank 'md5'"),
    ("leading-zero-index", b'{"sha256": {"07": "' + b"00" * 32 + b'"}}', "'07'"),
    ("index-out-of-range", b'{"sha256": {"64": "' + b"00" * 32 + b'"}}', "out of range"),
    ("wrong-size", b'{"sha256": {"0": "' + b"00" * 20 + b'"}}', "20 bytes"),
    ("not-hex", b'{"sha256": {"0": "zz"}}', "not valid hex"),
    ("value-not-string", b'{"sha256": {"0": 5}}', "not a hex string"),
    ("bank-not-object", b'{"sha256": []}', "not an object"),
    ("repeated-index", b'{"sha256": {"0": "' + b"00" * 32 + b'", "0": "' + b"11" * 32 + b'"}}', "repeats"),
    ("deep-nesting", b"[" * 30000 + b"]" * 30000, "JSON"),
    ("oversized", b" " * (65 * 1024), "limit"),
]


@pytest.mark.parametrize(("data", "reason"), [r[1:] for r in PCR_REFUSALS], ids=[r[0] for r in PCR_REFUSALS])
def test_malformed_pcr_values_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        parse_pcr_values(data)


AK_REFUSALS: list[tuple[str, bytes, str]] = [
    ("garbage-der", b"\x30\x03\x02\x01\x01", "SubjectPublicKeyInfo"),
    ("garbage-pem", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "SubjectPublicKeyInfo"),
    ("jwk-oct", b'{"kty": "oct", "k": "AAAA"}', "kty 'oct'"),
    ("jwk-missing-n", b'{"kty": "RSA", "e": "AQAB"}', "'n'"),
    ("jwk-bad-curve", b'{"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}', "P-521"),
    ("jwk-off-curve", b'{"kty": "EC", "crv": "P-256", "x": "AQ", "y": "AQ"}', "not a valid EC key"),
    ("oversized", b"\x00" * (17 * 1024), "limit"),
]


@pytest.mark.parametrize(("data", "reason"), [r[1:] for r in AK_REFUSALS], ids=[r[0] for r in AK_REFUSALS])
def test_malformed_ak_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        load_ak(data)
