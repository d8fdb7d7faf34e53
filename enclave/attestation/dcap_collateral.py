"""Intel DCAP collateral: the caller's named blobs, signatures over exact JSON text, CRLs.

The caller passes collateral as named byte blobs (no I/O here). Names:

``tcb_info``
    Intel PCS TCB info response, ``{"tcbInfo": {...}, "signature": "<r||s hex>"}``
    (TCB info v2 or v3, SGX or TDX).
``tcb_info_issuer_chain``
    PEM: the Intel SGX TCB Signing certificate (then optionally the root). PCS
    sends it in the ``TCB-Info-Issuer-Chain`` header. Required with ``tcb_info``.
``qe_identity``
    Intel PCS enclave identity response, ``{"enclaveIdentity": {...}, "signature": "..."}``
    (``QE`` for SGX quotes, ``TD_QE`` for TDX quotes).
``qe_identity_issuer_chain``
    PEM, as above (``SGX-Enclave-Identity-Issuer-Chain``). Required with ``qe_identity``.
``root_ca_crl``
    The Intel SGX Root CA CRL: DER, PEM or hex.
``pck_crl``
    The CRL of the PCK CA that issued the quote's PCK certificate: DER, PEM or hex.
``pck_crl_issuer_chain``
    PEM, optional; when given its first certificate must be the quote's PCK CA.
``quote_collateral``
    Instead of all of the above: a dcap-qvl ``QuoteCollateralV3`` JSON object
    (``tcb_info`` and ``qe_identity`` hold the exact signed JSON text,
    ``*_signature`` and the CRLs are hex, ``*_issuer_chain`` PEM).

The signed JSON documents are verified over their exact bytes as sent, never
a re-serialization; :mod:`enclave.attestation.dcap_tcb_info` parses them
afterwards. Any other name is refused, so a typo cannot silently leave a
check undone.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from enclave.attestation.dcap_pck import (
    TCB_SIGNING_CN,
    ec_public_key,
    load_certificate_chain_pem,
    parse_x509,
    verify_chain,
)
from enclave.errors import EvidenceError

MAX_COLLATERAL_BYTES = 1024 * 1024
COLLATERAL_NAMES = (
    "tcb_info",
    "tcb_info_issuer_chain",
    "qe_identity",
    "qe_identity_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "pck_crl_issuer_chain",
    "quote_collateral",
)


@dataclass(frozen=True)
class SignedDocument:
    """A signed PCS JSON document: its exact text, raw r||s signature and issuer chain (PEM)."""

    name: str
    text: bytes
    signature: bytes
    issuer_chain: bytes


@dataclass(frozen=True)
class Collateral:
    """The collateral pieces the caller supplied; ``None`` means not given (that check is not done)."""

    tcb_info: SignedDocument | None = None
    qe_identity: SignedDocument | None = None
    root_ca_crl: bytes | None = None
    pck_crl: bytes | None = None
    pck_crl_issuer_chain: bytes | None = None


def parse_collateral(collateral: Mapping[str, bytes] | None) -> Collateral:
    """Sort the caller's named blobs into a ``Collateral``; refuse unknown names and oversized blobs."""
    if not collateral:
        return Collateral()
    unknown = sorted(set(collateral) - set(COLLATERAL_NAMES))
    if unknown:
        raise EvidenceError(f"unknown DCAP collateral {unknown}; known names: {list(COLLATERAL_NAMES)}")
    for name, blob in collateral.items():
        if not isinstance(blob, bytes | bytearray) or not blob:
            raise EvidenceError(f"collateral {name!r} is empty or not bytes")
        if len(blob) > MAX_COLLATERAL_BYTES:
            raise EvidenceError(f"collateral {name!r} is {len(blob)} bytes, over the limit")
    if "quote_collateral" in collateral:
        if len(collateral) > 1:
            raise EvidenceError("give either 'quote_collateral' or the separate collateral pieces, not both")
        return _from_quote_collateral(bytes(collateral["quote_collateral"]))
    blobs = {name: bytes(blob) for name, blob in collateral.items()}
    return Collateral(
        tcb_info=_response(blobs, "tcb_info", "tcbInfo"),
        qe_identity=_response(blobs, "qe_identity", "enclaveIdentity"),
        root_ca_crl=_crl_der(blobs["root_ca_crl"], "root_ca_crl") if "root_ca_crl" in blobs else None,
        pck_crl=_crl_der(blobs["pck_crl"], "pck_crl") if "pck_crl" in blobs else None,
        pck_crl_issuer_chain=blobs.get("pck_crl_issuer_chain"),
    )


def _response(blobs: Mapping[str, bytes], name: str, key: str) -> SignedDocument | None:
    chain_name = f"{name}_issuer_chain"
    if name not in blobs:
        if chain_name in blobs:
            raise EvidenceError(f"collateral {chain_name!r} is given without {name!r}")
        return None
    if chain_name not in blobs:
        raise EvidenceError(f"collateral {name!r} needs {chain_name!r} (its signer's certificate chain)")
    text = _utf8(blobs[name], name)
    spans = _top_level_spans(text, name)
    if set(spans) != {key, "signature"}:
        raise EvidenceError(
            f"collateral {name!r} must hold exactly {key!r} and 'signature', has {sorted(spans)}"
        )
    start, end = spans[key]
    signature = json.loads(text[slice(*spans["signature"])])
    if not isinstance(signature, str):
        raise EvidenceError(f"collateral {name!r} signature is not a string")
    return SignedDocument(
        name=name,
        text=text[start:end].encode(),
        signature=_signature_hex(signature, f"{name} signature"),
        issuer_chain=blobs[chain_name],
    )


def _from_quote_collateral(blob: bytes) -> Collateral:
    doc = _loads(_utf8(blob, "quote_collateral"), "quote_collateral")
    if not isinstance(doc, dict):
        raise EvidenceError("collateral 'quote_collateral' is not a JSON object")
    fields: dict[str, str] = {}
    for key in (
        "tcb_info",
        "tcb_info_signature",
        "tcb_info_issuer_chain",
        "qe_identity",
        "qe_identity_signature",
        "qe_identity_issuer_chain",
        "root_ca_crl",
        "pck_crl",
        "pck_crl_issuer_chain",
    ):
        value = doc.get(key)
        if not isinstance(value, str) or not value:
            raise EvidenceError(f"quote_collateral field {key!r} is missing or not a string")
        fields[key] = value
    return Collateral(
        tcb_info=SignedDocument(
            name="tcb_info",
            text=fields["tcb_info"].encode(),
            signature=_signature_hex(fields["tcb_info_signature"], "quote_collateral tcb_info_signature"),
            issuer_chain=fields["tcb_info_issuer_chain"].encode(),
        ),
        qe_identity=SignedDocument(
            name="qe_identity",
            text=fields["qe_identity"].encode(),
            signature=_signature_hex(
                fields["qe_identity_signature"], "quote_collateral qe_identity_signature"
            ),
            issuer_chain=fields["qe_identity_issuer_chain"].encode(),
        ),
        root_ca_crl=_crl_der(fields["root_ca_crl"].encode(), "quote_collateral root_ca_crl"),
        pck_crl=_crl_der(fields["pck_crl"].encode(), "quote_collateral pck_crl"),
        pck_crl_issuer_chain=fields["pck_crl_issuer_chain"].encode(),
    )


def verify_signed_document(
    doc: SignedDocument, root: x509.Certificate, now: datetime
) -> tuple[dict[str, Any], x509.Certificate]:
    """Check the issuer chain to ``root`` and the signature over the exact text.

    Returns the parsed JSON object and the signing certificate.
    """
    chain = load_certificate_chain_pem(doc.issuer_chain, f"{doc.name} issuer chain")
    if not chain:
        raise EvidenceError(f"{doc.name} issuer chain holds no certificate")
    verify_chain(chain, root, now, f"{doc.name} issuer chain", leaf_names=(TCB_SIGNING_CN,))
    key = ec_public_key(chain[0], f"{doc.name} signer")
    r, s = int.from_bytes(doc.signature[:32], "big"), int.from_bytes(doc.signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), doc.text, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EvidenceError(
            f"{doc.name} signature does not verify with its TCB Signing certificate"
        ) from None
    body = _loads(_utf8(doc.text, doc.name), doc.name)
    if not isinstance(body, dict):
        raise EvidenceError(f"{doc.name} is not a JSON object")
    return body, chain[0]


def load_crl(der: bytes, what: str) -> x509.CertificateRevocationList:
    def load() -> x509.CertificateRevocationList:
        crl = x509.load_der_x509_crl(der)
        _ = (
            crl.issuer,
            crl.last_update_utc,
            crl.next_update_utc,
            crl.extensions,
            crl.signature_hash_algorithm,
        )
        _ = [entry.serial_number for entry in crl]
        return crl

    return parse_x509(load, what)


def check_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate, what: str) -> None:
    """The CRL names ``issuer`` and carries its signature."""
    if crl.issuer != issuer.subject:
        raise EvidenceError(f"{what} is issued by {crl.issuer.rfc4514_string()}, not by the expected CA")
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        raise EvidenceError(f"{what} issuer has no usable key usage extension") from None
    if not usage.crl_sign:
        raise EvidenceError(f"{what} issuer may not sign CRLs")
    key = ec_public_key(issuer, f"{what} issuer")
    try:
        valid = crl.is_signature_valid(key)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise EvidenceError(f"{what} signature does not verify with its issuer's key")
    if crl.next_update_utc is None:
        raise EvidenceError(f"{what} has no nextUpdate")


def is_revoked(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def freshness(
    what: str, issued: datetime, next_update: datetime, now: datetime, *, accept_expired: bool
) -> str | None:
    """Refuse collateral issued after ``now``; expired collateral is refused unless ``accept_expired``.

    Returns a warning to report when expired collateral was accepted.
    """
    if issued > now:
        raise EvidenceError(
            f"{what} is issued {issued.isoformat()}, after the verification time {now.isoformat()}"
        )
    if now > next_update:
        message = f"{what} expired at {next_update.isoformat()} (verification time {now.isoformat()})"
        if not accept_expired:
            raise EvidenceError(message)
        return message + "; accepted because expired collateral was allowed"
    return None


def _crl_der(blob: bytes, what: str) -> bytes:
    if blob[:1] == b"\x30":
        return blob
    text = blob.strip()
    if text.startswith(b"-----BEGIN X509 CRL-----"):
        crl = parse_x509(lambda: x509.load_pem_x509_crl(text), what)
        return crl.public_bytes(serialization.Encoding.DER)
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        raise EvidenceError(f"{what} is neither DER, PEM nor hex") from None


def _utf8(blob: bytes, what: str) -> str:
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError:
        raise EvidenceError(f"collateral {what!r} is not UTF-8 text") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise EvidenceError(f"JSON object repeats the key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> None:
    raise EvidenceError(f"JSON holds the non-standard constant {name}")


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise EvidenceError(f"{what} is not valid JSON: {exc}") from None


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _top_level_spans(text: str, what: str) -> dict[str, tuple[int, int]]:
    """The character span of each member value of the top-level JSON object, exactly as written."""
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    spans: dict[str, tuple[int, int]] = {}
    try:
        pos = _skip_ws(text, 0)
        if text[pos : pos + 1] != "{":
            raise ValueError("not a JSON object")
        pos = _skip_ws(text, pos + 1)
        while text[pos : pos + 1] != "}":
            if text[pos : pos + 1] != '"':
                raise ValueError(f"expected a member name at {pos}")
            key, pos = decoder.raw_decode(text, pos)
            if not isinstance(key, str):
                raise ValueError(f"expected a member name at {pos}")
            pos = _skip_ws(text, pos)
            if text[pos : pos + 1] != ":":
                raise ValueError(f"expected ':' at {pos}")
            start = _skip_ws(text, pos + 1)
            _, end = decoder.raw_decode(text, start)
            if key in spans:
                raise ValueError(f"the key {key!r} is repeated")
            spans[key] = (start, end)
            pos = _skip_ws(text, end)
            if text[pos : pos + 1] == ",":
                pos = _skip_ws(text, pos + 1)
                if text[pos : pos + 1] == "}":
                    raise ValueError("trailing comma")
            elif text[pos : pos + 1] != "}":
                raise ValueError(f"expected ',' or '}}' at {pos}")
        if _skip_ws(text, pos + 1) != len(text):
            raise ValueError("text after the JSON object")
    except (ValueError, RecursionError) as exc:
        raise EvidenceError(f"collateral {what!r} is not valid JSON: {exc}") from None
    return spans


def _signature_hex(value: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise EvidenceError(f"{what} is not hex") from None
    if len(raw) != 64:
        raise EvidenceError(f"{what} is {len(raw)} bytes, expected 64 (r || s)")
    return raw
