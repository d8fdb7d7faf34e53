"""AMD SEV-SNP: verify an attestation report against AMD's certificate chain.

The chain of trust, all of it checked here without I/O (the caller fetches
certificates from AMD KDS or the host's certificate table and passes them in):

1. ``ARK-<product>`` is self-signed and pinned: its SHA-256 over DER must be one
   of ``ARK_SHA256`` (or of the roots the caller passes instead).
2. ``SEV-<product>`` (ASK) is signed by the ARK and signs the VCEK; or
   ``SEV-VLEK-<product>`` (ASVK) is signed by the ARK and signs the VLEK.
   Every certificate is RSASSA-PSS with SHA-384, MGF1-SHA-384 and a 48-byte salt,
   verified explicitly, and must be valid at the caller's ``now``.
3. The VCEK is bound to the report: its hwID extension equals CHIP_ID (unless the
   host masked CHIP_ID to zero, or the key is a VLEK, which names no chip), and
   its TCB extensions equal REPORTED_TCB (the VCEK is derived from that TCB).
   These cheap comparisons run before the signature, so a VCEK fetched for the
   wrong chip or TCB is reported as such rather than as a bad signature.
4. The report's ECDSA P-384/SHA-384 signature (R, S little-endian) over
   ``report[0:0x2A0]`` verifies with the VCEK/VLEK public key.

5. When the ARK-signed CRL is given (collateral or evidence part ``crl``), it
   must be signed by that ARK, current at ``now``, and list neither the
   ASK/ASVK nor the VCEK/VLEK (``sev_snp_crl``); without it, revocation is
   named as not checked.

Not checked: whether the TCB is current against AMD's latest (no AMD
collateral states it).

The measurement log: SNP has no register a guest can extend after launch, so
``PlatformClaims.log_register`` is None and ``appraise`` does not replay the
log. The log is bound to SNP evidence solely through REPORT_DATA, which carries
the hash of the claims (log included); the launch MEASUREMENT vouches for the
code that wrote it.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import SignatureAlgorithmOID

from enclave.attestation.certificates import check_validity
from enclave.attestation.interface import Evidence, PlatformClaims, Verifier
from enclave.attestation.sev_snp_certs import (
    TCB_OIDS,
    EndorsementKey,
    common_name,
    endorsement_key,
    load_certificates,
    sha256_fingerprint,
)
from enclave.attestation.sev_snp_crl import COLLATERAL_CRL, check_crl
from enclave.attestation.sev_snp_report import Product, SigningKey, SnpReport, TcbVersion, parse_report
from enclave.errors import BindingError, EvidenceError

PLATFORM = "sev-snp"
PART_REPORT = "report"
PART_VCEK = "vcek"  # the VCEK or VLEK, DER or PEM (a PEM bundle may carry the chain too)
COLLATERAL_CERT_CHAIN = "cert_chain"  # PEM bundle: ASK and/or ASVK, and the ARK

# SHA-256 over the DER of AMD's root keys, as published by AMD KDS
# (https://kdsintf.amd.com/vcek/v1/<product>/cert_chain) and bundled identically
# by go-sev-guest, trustee and virtee/sev (see ../shared/vectors/MANIFEST.md).
ARK_SHA256: Mapping[Product, str] = MappingProxyType(
    {
        Product.MILAN: "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        Product.GENOA: "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
        Product.TURIN: "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
    }
)

# CHIP_ID bytes the hwID covers: Turin VCEKs carry an 8-byte hwID.
_HWID_SIZE = {Product.MILAN: 64, Product.GENOA: 64, Product.TURIN: 8}
# CPUID family reported by version 3 reports.
_CPU_FAMILY = {Product.MILAN: 0x19, Product.GENOA: 0x19, Product.TURIN: 0x1A}
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


@dataclass(frozen=True)
class VerifiedReport:
    """A report whose chain, bindings and signature all checked out."""

    report: SnpReport
    product: Product
    endorsement: EndorsementKey
    ark_sha256: str
    checks: tuple[str, ...]
    crl_checked: bool = False

    @property
    def reported_tcb(self) -> TcbVersion:
        return TcbVersion.decode(self.report.reported_tcb, self.product)

    def not_checked(self) -> dict[str, str]:
        """What could not be established from what was given, by topic."""
        gaps = {"tcb_currency": "no AMD collateral states the latest TCB"}
        if not self.crl_checked:
            gaps = {"revocation": "no AMD CRL was given: ASK/VCEK revocation not checked", **gaps}
        return gaps

    def details(self) -> dict[str, Any]:
        """Every parsed field plus what was verified, JSON-friendly."""
        out = self.report.to_dict(self.product)
        out.update(
            product=self.product.value,
            endorsement_product_name=self.endorsement.product_name,
            endorsement_tcb=dict(self.endorsement.tcb),
            csp_id=self.endorsement.csp_id,
            ark_sha256=self.ark_sha256,
            checks=list(self.checks),
            not_checked=list(self.not_checked().values()),
        )
        return out


def verify_report(
    report: bytes,
    vcek: bytes,
    chain: bytes | None,
    *,
    now: datetime,
    roots: Sequence[bytes] | None = None,
    product: Product | None = None,
    crl: bytes | None = None,
) -> VerifiedReport:
    """Verify a raw report, its VCEK/VLEK (DER or PEM) and the ASK/ASVK/ARK PEM bundle.

    ``roots`` (DER or PEM ARKs) replaces the pinned ``ARK_SHA256``; ``product``
    insists on one product; ``crl`` (the ARK-signed CRL, DER or PEM) is checked
    and refuses the report when stale, badly signed or listing the chain.
    Raises ``EvidenceError`` naming the first failure, ``ValueError`` for a
    naive ``now`` or ``roots`` that are not ARKs.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    parsed = parse_report(report)
    if parsed.signing_key is SigningKey.NONE:
        raise EvidenceError("SEV-SNP report KEY_INFO.SIGNING_KEY is 7: the firmware did not sign it")
    if parsed.mask_chip_key:
        raise EvidenceError("SEV-SNP report KEY_INFO.MASK_CHIP_KEY is set: it carries no VCEK signature")

    leaf, *extra = load_certificates(vcek, "VCEK/VLEK")
    candidates = extra + (load_certificates(chain, "certificate chain") if chain else [])
    anchors: dict[str, Product | None]
    if roots is None:
        anchors = {fp: p for p, fp in ARK_SHA256.items()}
    else:
        root_certs = [c for r in roots for c in load_certificates(r, "trusted root")]
        if not root_certs:
            raise ValueError("an empty list of trusted roots trusts nothing")
        for root in root_certs:
            if root.subject != root.issuer or not common_name(root).startswith("ARK-"):
                raise ValueError(f"trusted root {common_name(root)!r} is not a self-issued AMD ARK")
        anchors = {sha256_fingerprint(c): None for c in root_certs}
        candidates += root_certs

    checks: list[str] = []
    chain_product, ark_sha256, ark, middle = _verify_chain(
        leaf, candidates, parsed.signing_key, anchors, now, checks
    )
    if crl is not None:
        revocable = ((middle, common_name(middle)), (leaf, parsed.signing_key.name))
        checks.append(check_crl(crl, ark=ark, revocable=revocable, now=now))
    if product is not None and product is not chain_product:
        raise EvidenceError(f"certificate chain is for {chain_product.value}, expected {product.value}")
    key = endorsement_key(leaf, parsed.signing_key)
    if key.product_name is not None and key.product_name.split("-")[0] != chain_product.value:
        raise EvidenceError(
            f"{parsed.signing_key.name} product name {key.product_name!r} is not {chain_product.value}"
        )
    if parsed.version >= 3 and parsed.cpuid_fam_id != _CPU_FAMILY[chain_product]:
        raise EvidenceError(
            f"SEV-SNP report CPUID_FAM_ID {parsed.cpuid_fam_id:#x} is not the {chain_product.value} family"
        )
    checks.append(check_chip_id(parsed, key, chain_product))
    checks.append(check_reported_tcb(parsed, key, chain_product))
    _verify_report_signature(parsed, key)
    checks.append(
        f"report signature (ECDSA P-384, SHA-384) over bytes 0..0x2A0 verified by the {key.kind.name}"
    )
    return VerifiedReport(
        report=parsed,
        product=chain_product,
        endorsement=key,
        ark_sha256=ark_sha256,
        checks=tuple(checks),
        crl_checked=crl is not None,
    )


def check_chip_id(report: SnpReport, key: EndorsementKey, product: Product) -> str:
    """Bind CHIP_ID to the VCEK's hwID extension; return what was established."""
    if key.kind is SigningKey.VLEK:
        return "CHIP_ID not bound: a VLEK is issued per cloud provider, not per chip"
    if report.chip_id_masked:
        return "CHIP_ID is zero (host set MaskChipId): the chip is not identified"
    if key.hwid is None:
        raise EvidenceError("VCEK lacks the hwID extension (1.3.6.1.4.1.3704.1.4) to bind CHIP_ID to")
    size = _HWID_SIZE[product]
    if len(key.hwid) != size:
        raise EvidenceError(f"VCEK hwID is {len(key.hwid)} bytes; a {product.value} hwID is {size}")
    if not hmac.compare_digest(report.chip_id[:size], key.hwid):
        raise EvidenceError(
            f"SEV-SNP report CHIP_ID {report.chip_id.hex()} does not match the VCEK hwID "
            f"{key.hwid.hex()}: the VCEK is for another chip"
        )
    return "CHIP_ID equals the VCEK hwID"


def check_reported_tcb(report: SnpReport, key: EndorsementKey, product: Product) -> str:
    """Bind REPORTED_TCB to the VCEK/VLEK TCB extensions; return what was established."""
    tcb = TcbVersion.decode(report.reported_tcb, product)
    mismatches = []
    for name, value in tcb.components().items():
        if name not in key.tcb:
            raise EvidenceError(
                f"{key.kind.name} lacks the {name} TCB extension ({TCB_OIDS[name].dotted_string})"
            )
        if key.tcb[name] != value:
            mismatches.append(f"{name} {value} vs {key.kind.name} {key.tcb[name]}")
    if mismatches:
        raise EvidenceError(
            f"SEV-SNP report REPORTED_TCB {tcb.raw:#018x} does not match the {key.kind.name} TCB: "
            + ", ".join(mismatches)
        )
    return f"REPORTED_TCB {tcb.raw:#018x} equals the {key.kind.name} TCB ({product.value} layout)"


class SevSnpVerifier(Verifier):
    """``Verifier`` for SEV-SNP evidence.

    Evidence parts: ``report`` (raw 1184 bytes) and ``vcek`` (VCEK or VLEK, DER
    or PEM). Collateral (or evidence part) ``cert_chain``: PEM with the ASK or
    ASVK and the ARK; ``crl``: the ARK-signed CRL. ``vcek`` may come as
    collateral instead. The relying party's own collateral wins over what the
    evidence carries.
    """

    platform = PLATFORM

    def __init__(self, *, roots: Sequence[bytes] | None = None, product: Product | None = None) -> None:
        self._roots = None if roots is None else tuple(roots)
        self._product = product

    def verify(
        self,
        evidence: Evidence,
        *,
        report_data: bytes,
        now: datetime,
        collateral: Mapping[str, bytes] | None = None,
    ) -> PlatformClaims:
        if evidence.platform != PLATFORM:
            raise EvidenceError(f"expected {PLATFORM} evidence, got {evidence.platform!r}")
        extra = collateral or {}
        vcek = evidence.parts.get(PART_VCEK, extra.get(PART_VCEK))
        if vcek is None:
            raise EvidenceError(f"{PLATFORM} evidence lacks its {PART_VCEK!r} part (nor is it in collateral)")
        chain = extra.get(COLLATERAL_CERT_CHAIN, evidence.parts.get(COLLATERAL_CERT_CHAIN))
        crl = extra.get(COLLATERAL_CRL, evidence.parts.get(COLLATERAL_CRL))
        verified = verify_report(
            evidence.part(PART_REPORT),
            vcek,
            chain,
            now=now,
            roots=self._roots,
            product=self._product,
            crl=crl,
        )
        report = verified.report
        if not hmac.compare_digest(report.report_data, report_data):
            raise BindingError("SEV-SNP REPORT_DATA does not match the expected report data")
        return PlatformClaims(
            platform=PLATFORM,
            report_data=report.report_data,
            registers={
                "measurement": report.measurement,
                "host_data": report.host_data,
                "id_key_digest": report.id_key_digest,
                "author_key_digest": report.author_key_digest,
                "family_id": report.family_id,
                "image_id": report.image_id,
                "report_data": report.report_data,
            },
            simulated=False,
            log_register=None,
            log_hash="sha384",
            details=verified.details(),
        )


def _verify_chain(
    leaf: x509.Certificate,
    candidates: list[x509.Certificate],
    kind: SigningKey,
    anchors: Mapping[str, Product | None],
    now: datetime,
    checks: list[str],
) -> tuple[Product, str, x509.Certificate, x509.Certificate]:
    """Check leaf <- ASK/ASVK <- ARK; return the product, ARK fingerprint, ARK and ASK/ASVK."""
    leaf_cn = f"SEV-{kind.name}"
    if common_name(leaf) != leaf_cn:
        raise EvidenceError(
            f"report KEY_INFO says {kind.name} but the certificate is {common_name(leaf)!r}, not {leaf_cn!r}"
        )
    middle = _issuer_of(leaf, candidates, "ASK" if kind is SigningKey.VCEK else "ASVK")
    middle_cn = common_name(middle)
    prefix = "SEV-" if kind is SigningKey.VCEK else "SEV-VLEK-"
    product = _product_named(middle_cn, prefix)
    ark = _issuer_of(middle, candidates, "ARK")
    if ark.subject != ark.issuer or common_name(ark) != f"ARK-{product.value}":
        raise EvidenceError(
            f"{middle_cn} is issued by {common_name(ark)!r}, not the self-signed ARK-{product.value}"
        )
    fingerprint = sha256_fingerprint(ark)
    if fingerprint not in anchors:
        raise EvidenceError(f"ARK-{product.value} (sha256 {fingerprint}) is not a trusted AMD root")
    pinned = anchors[fingerprint]
    if pinned is not None and pinned is not product:
        raise EvidenceError(f"trusted root {fingerprint} is ARK-{pinned.value}, not ARK-{product.value}")
    checks.append(f"ARK-{product.value} sha256 {fingerprint} is a trusted root")
    for cert, issuer, label in (
        (ark, ark, f"ARK-{product.value}"),
        (middle, ark, middle_cn),
        (leaf, middle, kind.name),
    ):
        _check_pss_signature(cert, issuer, label)
        checks.append(f"{label} signature (RSA-PSS SHA-384, salt 48) verified with {common_name(issuer)}")
    for cert, label in ((ark, f"ARK-{product.value}"), (middle, middle_cn)):
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
            is_ca = False
        if not is_ca:
            raise EvidenceError(f"{label} is not a CA certificate (basicConstraints cA)")
    for cert, label in ((ark, f"ARK-{product.value}"), (middle, middle_cn), (leaf, kind.name)):
        check_validity(cert, now, f"{label} certificate")
    checks.append(f"ARK, {middle_cn} and {kind.name} certificates valid at {now.isoformat()}")
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise EvidenceError(f"{kind.name} public key is not an ECDSA P-384 key")
    return product, fingerprint, ark, middle


def _issuer_of(cert: x509.Certificate, candidates: list[x509.Certificate], label: str) -> x509.Certificate:
    found = {c.public_bytes(serialization.Encoding.DER): c for c in candidates if c.subject == cert.issuer}
    if not found:
        raise EvidenceError(f"certificate chain lacks the {label} that issued {common_name(cert)!r}")
    if len(found) > 1:
        raise EvidenceError(f"certificate chain holds {len(found)} different {label}s named {cert.issuer}")
    return next(iter(found.values()))


def _check_pss_signature(cert: x509.Certificate, issuer: x509.Certificate, label: str) -> None:
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        raise EvidenceError(f"{label} is not signed with RSASSA-PSS")
    try:
        digest = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        digest = None
    if not isinstance(digest, hashes.SHA384):
        raise EvidenceError(f"{label} signature does not use SHA-384")
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise EvidenceError(f"{common_name(issuer)} key is not RSA")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        raise EvidenceError(f"{label} signature does not verify with {common_name(issuer)}") from None


def _verify_report_signature(report: SnpReport, key: EndorsementKey) -> None:
    public_key = key.certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)  # checked with the chain
    signature = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        public_key.verify(signature, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError(f"SEV-SNP report SIGNATURE does not verify with the {key.kind.name}") from None


def _product_named(common_name: str, prefix: str) -> Product:
    for product in Product:
        if common_name == prefix + product.value:
            return product
    raise EvidenceError(f"{common_name!r} is not an AMD {prefix}<Milan|Genoa|Turin> certificate")
