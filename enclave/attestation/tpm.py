"""The TPM 2.0 platform: verify a ``TPM2_Quote`` and turn it into platform claims.

A quote is a ``TPMS_ATTEST`` signed by the TPM's attestation key (AK). It
carries the caller's qualifying data (``extraData``) and a digest of the
selected PCRs, not the PCR values themselves; those travel beside it. The
checks, in order:

1. parse the quote, signature, AK and PCR values, each bounded in size;
2. verify the signature over the ``TPMS_ATTEST`` bytes with the AK
   (RSASSA-PKCS1-v1_5, RSA-PSS or ECDSA on P-256/P-384; SHA-1 is refused);
3. compare ``extraData`` with the expected qualifying data (``BindingError``):
   for ``tpm`` evidence, SHA-256 of the 64-byte report data (see
   :func:`qualifying_data`);
4. recompute ``pcrDigest = H(PCR[i] || ...)`` over the quote's selection,
   bank by bank in selection order and each bank's PCRs ascending, with H the
   signature's hash algorithm (TPM 2.0 Part 3, ``TPM2_Quote``), and require
   exactly the selected PCR values to have been supplied.

Who vouches for the AK is a separate question. ``TpmVerifier`` can check an AK
certificate chain to caller-supplied roots (the custodian's AK CA issues one
after credential activation); the AK must then be a ``TPMT_PUBLIC`` with the
attributes of a TPM-resident restricted signing key, and the certificate an AK
certificate (see :func:`enclave.attestation.tpm_ak.verify_ak_certificate`).
Otherwise it reports ``ak_trust = "none"`` and a policy must establish trust in
the AK some other way (EK certificate and credential activation, or a
hardware report that binds the AK as on Azure, see
:mod:`enclave.attestation.az_vtpm`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from enclave.attestation.interface import REPORT_DATA_SIZE, Evidence, PlatformClaims, Verifier
from enclave.attestation.tpm_ak import (
    AttestationKey,
    json_object,
    load_ak,
    load_certificates,
    verify_ak_certificate,
)
from enclave.attestation.tpm_structures import (
    DIGEST_SIZES,
    HASH_NAMES,
    TPM_ALG_ECDSA,
    TPM_ALG_NULL,
    TPM_ALG_RSAPSS,
    TPM_ALG_RSASSA,
    Attest,
    TpmSignature,
    alg_name,
    parse_attest,
    parse_signature,
)
from enclave.errors import BindingError, EvidenceError

PLATFORM = "tpm"
DEFAULT_APP_PCR = 15
MAX_PCR_JSON_BYTES = 64 * 1024
MAX_PCR_INDEX = 63
MIN_RSA_BITS = 2048

PcrValues = Mapping[str, Mapping[int, bytes]]


def qualifying_data(report_data: bytes) -> bytes:
    """The quote's qualifyingData for ``report_data``: its SHA-256.

    A TPM takes qualifying data no larger than its largest digest (32 bytes on
    a SHA-256-only TPM), so the 64-byte report data goes in hashed.
    """
    return hashlib.sha256(report_data).digest()


_SIGNATURE_HASHES: Mapping[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}
_EC_CURVES = ("secp256r1", "secp384r1")


@dataclass(frozen=True)
class QuoteClaims:
    """A quote whose signature and PCR digest checked out, with the PCR values it covers."""

    attest: Attest
    signature: TpmSignature
    # Quoted PCR values by bank ("sha256") and index; only PCRs the quote selects.
    pcrs: PcrValues = field(default_factory=dict)

    @property
    def nonce(self) -> bytes:
        """The quote's qualifying data (``extraData``)."""
        return self.attest.extra_data

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.attest.to_dict(),
            "signature_scheme": f"{self.signature.scheme}-{self.signature.hash_name}",
            "pcrs": {
                bank: {str(i): v.hex() for i, v in values.items()} for bank, values in self.pcrs.items()
            },
        }


def parse_pcr_values(data: bytes) -> dict[str, dict[int, bytes]]:
    """PCR values as JSON: ``{"sha256": {"0": "<hex>", ...}, "sha384": {...}}``."""
    if len(data) > MAX_PCR_JSON_BYTES:
        raise EvidenceError(f"PCR values are {len(data)} bytes, over the {MAX_PCR_JSON_BYTES}-byte limit")
    doc = json_object(data, "PCR values")
    parsed: dict[str, dict[int, bytes]] = {}
    for bank, values in doc.items():
        if not isinstance(values, dict):
            raise EvidenceError(f"PCR values for bank {bank!r} are not an object")
        bank_values: dict[int, bytes] = {}
        for index, value in values.items():
            if not (isinstance(index, str) and index.isdecimal() and index == str(int(index))):
                raise EvidenceError(f"PCR index {index!r} in bank {bank!r} is not a decimal number")
            if not isinstance(value, str):
                raise EvidenceError(f"PCR {bank}:{index} is not a hex string")
            try:
                bank_values[int(index)] = bytes.fromhex(value)
            except ValueError:
                raise EvidenceError(f"PCR {bank}:{index} is not valid hex") from None
        parsed[str(bank)] = bank_values
    _check_pcr_values(parsed)
    return parsed


def _check_pcr_values(pcrs: PcrValues) -> None:
    for bank, values in pcrs.items():
        size = DIGEST_SIZES.get(bank)
        if size is None:
            raise EvidenceError(f"PCR bank {bank!r} is not one of {', '.join(DIGEST_SIZES)}")
        for index, value in values.items():
            if not isinstance(index, int) or not 0 <= index <= MAX_PCR_INDEX:
                raise EvidenceError(f"PCR index {index!r} in bank {bank} is out of range")
            if not isinstance(value, bytes | bytearray):
                raise EvidenceError(f"PCR {bank}:{index} is not bytes")
            if len(value) != size:
                raise EvidenceError(f"PCR {bank}:{index} is {len(value)} bytes, a {bank} PCR has {size}")


def verify_quote(
    quote: bytes,
    signature: bytes | TpmSignature,
    ak: bytes | AttestationKey,
    pcrs: bytes | PcrValues,
    *,
    nonce: bytes | None = None,
) -> QuoteClaims:
    """Verify a quote (``TPMS_ATTEST``) and the PCR values it covers; return what it attests.

    ``signature`` is a ``TPMT_SIGNATURE`` (or an already parsed one), ``ak`` the
    AK in any encoding :func:`enclave.attestation.tpm_ak.load_ak` reads, and
    ``pcrs`` JSON or a mapping ``{bank: {index: value}}``. ``nonce`` is the
    expected qualifying data; ``None`` skips that comparison (for viewing
    evidence only: without it a quote proves nothing about freshness).
    Raises ``EvidenceError``, or ``BindingError`` for a nonce mismatch.
    """
    attest = parse_attest(quote)
    sig = signature if isinstance(signature, TpmSignature) else parse_signature(signature)
    key = ak if isinstance(ak, AttestationKey) else load_ak(ak)
    values: PcrValues
    if isinstance(pcrs, bytes | bytearray):
        values = parse_pcr_values(bytes(pcrs))
    else:
        _check_pcr_values(pcrs)
        values = pcrs
    hash_name = _verify_signature(attest.raw, sig, key)
    if nonce is not None and not hmac.compare_digest(attest.extra_data, nonce):
        raise BindingError("quote extraData does not match the expected nonce (qualifying data)")
    quoted = _check_pcr_digest(attest, values, hash_name)
    return QuoteClaims(attest=attest, signature=sig, pcrs=quoted)


def _verify_signature(message: bytes, sig: TpmSignature, ak: AttestationKey) -> str:
    """Verify ``sig`` over ``message`` with the AK; return the signature's hash name."""
    hash_name = HASH_NAMES.get(sig.hash_alg)
    algorithm = _SIGNATURE_HASHES.get(hash_name or "")
    if hash_name is None or algorithm is None:
        raise EvidenceError(
            f"quote signature hash {alg_name(sig.hash_alg)} is not SHA-256, SHA-384 or SHA-512"
        )
    declared = ak.tpm_public
    if declared is not None and declared.scheme != TPM_ALG_NULL:
        if (declared.scheme, declared.scheme_hash) != (sig.sig_alg, sig.hash_alg):
            raise EvidenceError(
                f"quote signature {sig.scheme}/{hash_name} is not the AK's scheme "
                f"{alg_name(declared.scheme)}/{alg_name(declared.scheme_hash or 0)}"
            )
    key = ak.key
    try:
        if isinstance(key, rsa.RSAPublicKey) and sig.sig_alg in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
            if key.key_size < MIN_RSA_BITS:
                raise EvidenceError(f"AK is RSA-{key.key_size}, shorter than {MIN_RSA_BITS} bits")
            pad: padding.AsymmetricPadding = padding.PKCS1v15()
            if sig.sig_alg == TPM_ALG_RSAPSS:
                # TPMs use a salt as long as the digest or the longest the key allows.
                pad = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.AUTO)
            key.verify(sig.signature, message, pad, algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and sig.sig_alg == TPM_ALG_ECDSA:
            if key.curve.name not in _EC_CURVES:
                raise EvidenceError(f"AK curve {key.curve.name} is not P-256 or P-384")
            der = encode_dss_signature(int.from_bytes(sig.r, "big"), int.from_bytes(sig.s, "big"))
            key.verify(der, message, ec.ECDSA(algorithm))
        else:
            raise EvidenceError(f"quote signature scheme {sig.scheme} does not fit the AK's key type")
    except InvalidSignature:
        raise EvidenceError("quote signature does not verify with the AK") from None
    return hash_name


def _check_pcr_digest(attest: Attest, pcrs: PcrValues, hash_name: str) -> dict[str, dict[int, bytes]]:
    """Recompute pcrDigest from the supplied values; return the quoted values by bank."""
    selected = {(sel.bank, i) for sel in attest.pcr_selection for i in sel.pcrs}
    for bank, values in pcrs.items():
        for index in values:
            if (bank, index) not in selected:
                raise EvidenceError(f"PCR {bank}:{index} was supplied but the quote does not cover it")
    digest = hashlib.new(hash_name)
    quoted: dict[str, dict[int, bytes]] = {}
    for sel in attest.pcr_selection:
        bank_values = pcrs.get(sel.bank, {})
        quoted[sel.bank] = {}
        for index in sel.pcrs:
            value = bank_values.get(index)
            if value is None:
                raise EvidenceError(
                    f"PCR {sel.bank}:{index} is selected by the quote but its value is missing"
                )
            digest.update(value)
            quoted[sel.bank][index] = value
    if not hmac.compare_digest(digest.digest(), attest.pcr_digest):
        raise EvidenceError(f"PCR values do not match the quote's pcrDigest ({hash_name})")
    return quoted


class TpmVerifier(Verifier):
    """Verifies ``tpm`` evidence: a quote over the application PCR, qualified by the report data.

    Evidence parts: ``quote`` (``TPMS_ATTEST``), ``signature``
    (``TPMT_SIGNATURE``), ``ak`` (``TPMT_PUBLIC`` or SubjectPublicKeyInfo),
    ``pcrs`` (JSON, see :func:`parse_pcr_values`), and optionally ``ak_cert``
    (DER or PEM) with ``ak_chain`` (PEM intermediates).

    AK roots come from ``ak_roots`` here or from ``collateral["ak_roots"]``
    (PEM or DER); ``collateral["ak_intermediates"]`` may add intermediates.
    When any root is configured the AK must be a ``TPMT_PUBLIC`` and the AK
    certificate is required and must chain to one at ``now``; the claims then
    say ``ak_trust = "certificate"``. Without roots they say
    ``ak_trust = "none"``: the quote is internally consistent, and whoever
    appraises it must trust the AK by other means. ``require_tpm_public``
    refuses a bare-key AK even then (for a caller that trusts the AK by
    activating a credential for its Name, which only a ``TPMT_PUBLIC`` has).
    """

    platform = PLATFORM

    def __init__(
        self,
        *,
        app_pcr: int = DEFAULT_APP_PCR,
        ak_roots: Sequence[x509.Certificate] = (),
        require_tpm_public: bool = False,
    ) -> None:
        if not 0 <= app_pcr <= MAX_PCR_INDEX:
            raise ValueError(f"application PCR {app_pcr} is out of range")
        self.app_pcr = app_pcr
        self._ak_roots = tuple(ak_roots)
        self._require_tpm_public = require_tpm_public

    def verify(
        self,
        evidence: Evidence,
        *,
        report_data: bytes,
        now: datetime,
        collateral: Mapping[str, bytes] | None = None,
    ) -> PlatformClaims:
        if evidence.platform != PLATFORM:
            raise EvidenceError(f"expected tpm evidence, got {evidence.platform!r}")
        if len(report_data) != REPORT_DATA_SIZE:
            raise BindingError(f"report data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
        ak = load_ak(evidence.part("ak"))
        if self._require_tpm_public and ak.tpm_public is None:
            raise EvidenceError(
                f"AK is a bare {ak.encoding} key, not a TPMT_PUBLIC: nothing shows it is a TPM's "
                "restricted signing key"
            )
        quote = verify_quote(
            evidence.part("quote"),
            evidence.part("signature"),
            ak,
            evidence.part("pcrs"),
            nonce=qualifying_data(report_data),
        )
        ak_trust = self._ak_trust(evidence, ak, now, collateral or {})
        registers = {
            f"pcr.{bank}.{index}": value
            for bank, values in quote.pcrs.items()
            for index, value in values.items()
        }
        # The measurement log is folded into the application PCR: SHA-384 bank preferred.
        banks = [b for b in ("sha384", "sha256") if f"pcr.{b}.{self.app_pcr}" in registers]
        if not banks:
            raise EvidenceError(
                f"quote does not cover the application PCR {self.app_pcr} in the sha384 or sha256 bank"
            )
        log_hash = banks[0]
        details = quote.to_dict()
        del details["pcrs"]
        details.update(ak_trust=ak_trust, ak_encoding=ak.encoding)
        return PlatformClaims(
            platform=PLATFORM,
            report_data=report_data,  # bound: the quote's qualifying data is its SHA-256
            registers=registers,
            simulated=False,
            log_register=f"pcr.{log_hash}.{self.app_pcr}",
            log_hash=log_hash,
            details=details,
        )

    def _ak_trust(
        self, evidence: Evidence, ak: AttestationKey, now: datetime, collateral: Mapping[str, bytes]
    ) -> str:
        roots = list(self._ak_roots)
        if "ak_roots" in collateral:
            roots += load_certificates(collateral["ak_roots"], "collateral ak_roots")
        if not roots:
            return "none"
        if "ak_cert" not in evidence.parts:
            raise EvidenceError("AK roots are configured but the evidence has no ak_cert")
        certificates = load_certificates(evidence.part("ak_cert"), "ak_cert")
        if len(certificates) != 1:
            raise EvidenceError(f"ak_cert holds {len(certificates)} certificates, expected one")
        intermediates: list[x509.Certificate] = []
        if "ak_chain" in evidence.parts:
            intermediates += load_certificates(evidence.part("ak_chain"), "ak_chain")
        if "ak_intermediates" in collateral:
            intermediates += load_certificates(collateral["ak_intermediates"], "collateral ak_intermediates")
        verify_ak_certificate(certificates[0], ak, roots=roots, intermediates=intermediates, now=now)
        return "certificate"
