"""Check a piece of platform evidence for a person: what it says and what was verified.

Used by ``custos-verify``. Every check the platform's verifier does is run on
what the caller supplies; collateral that is not supplied is named as not
checked rather than silently skipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from enclave.attestation import Evidence, ReferenceValues, dcap, nitro, policy, sev_snp, tpm, tpm_ak
from enclave.attestation.dcap_pck import PCK_CA_CNS, TCB_SIGNING_CN
from enclave.attestation.dcap_quote import decode_quote_text, parse_quote
from enclave.attestation.nitro_document import decode_document_text, parse_document
from enclave.attestation.sev_snp_report import Product, parse_report
from enclave.attestation.tpm_structures import parse_attest
from enclave.collateral.amd_kds import AmdKds
from enclave.errors import BindingError, EnclaveError, EvidenceError


@dataclass
class EvidenceReport:
    """What custos-verify prints: parsed claims, checks done and not done, mismatches."""

    platform: str
    verified: bool
    claims: dict[str, Any] = field(default_factory=dict)
    checks_done: list[str] = field(default_factory=list)
    checks_not_done: dict[str, str] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    error: str | None = None
    registers: dict[str, bytes] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "verified": self.verified and not self.mismatches,
            "error": self.error,
            "mismatches": self.mismatches,
            "checks_done": self.checks_done,
            "checks_not_done": self.checks_not_done,
            "claims": self.claims,
        }


def _hexify(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): _hexify(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_hexify(v) for v in value]
    return value


def _decode_text(data: bytes) -> bytes:
    """Raw binary, or hex with an optional 0x prefix."""
    text = data.strip()
    if text[:2] in (b"0x", b"0X"):
        text = text[2:]
    try:
        return bytes.fromhex(text.decode("ascii")) if text else data
    except (UnicodeDecodeError, ValueError):
        return data


def dcap_collateral(files: Sequence[tuple[str | None, bytes]]) -> dict[str, bytes]:
    """Name each collateral file: explicit ``NAME=FILE``, or recognised by its content.

    A DER (or PEM) CRL is named by its issuer (the Root CA's or a PCK CA's); an
    issuer chain PEM by its first certificate: a TCB Signing chain serves both
    signed documents, a PCK CA chain the PCK CRL.
    """
    named: dict[str, bytes] = {}
    chains: list[tuple[str, bytes]] = []
    for name, data in files:
        kind = name or _recognise(data)
        if kind == _TCB_SIGNING_CHAIN:
            chains.append((kind, data))
        else:
            named[kind] = data
    for _, data in chains:
        for document in ("tcb_info", "qe_identity"):
            if document in named:
                named.setdefault(f"{document}_issuer_chain", data)
    if chains and not any(f"{d}_issuer_chain" in named for d in ("tcb_info", "qe_identity")):
        raise EvidenceError("a TCB Signing issuer chain was given without TCB info or a QE identity")
    return named


# Not a collateral name: a chain that signs both TCB info and the QE identity.
_TCB_SIGNING_CHAIN = "tcb signing chain"


def _recognise(data: bytes) -> str:
    stripped = data.lstrip()
    if stripped.startswith(b"{"):
        try:
            doc = json.loads(stripped)
        except ValueError:
            raise EvidenceError("collateral JSON does not parse") from None
        if isinstance(doc, dict):
            if "tcbInfo" in doc:
                return "tcb_info"
            if "enclaveIdentity" in doc:
                return "qe_identity"
            if "tcb_info" in doc and "qe_identity" in doc:
                return "quote_collateral"
    by_issuer = _recognise_x509(stripped)
    if by_issuer is not None:
        return by_issuer
    raise EvidenceError(
        "cannot tell which collateral this file is; name it: --collateral NAME=FILE with NAME one of "
        + ", ".join(dcap.COLLATERAL_NAMES)
    )


def _recognise_x509(data: bytes) -> str | None:
    """A CRL by its issuer's name, an issuer chain by its first certificate's."""
    crl: x509.CertificateRevocationList | None = None
    try:
        if data.startswith(b"-----BEGIN X509 CRL-----"):
            crl = x509.load_pem_x509_crl(data)
        elif data[:1] == b"\x30":
            crl = x509.load_der_x509_crl(data)
    except ValueError:
        crl = None
    if crl is not None:
        issuer = _cn(crl.issuer)
        if issuer == "Intel SGX Root CA":
            return "root_ca_crl"
        if issuer in PCK_CA_CNS:
            return "pck_crl"
        return None
    if not data.startswith(b"-----BEGIN CERTIFICATE-----"):
        return None
    try:
        first = x509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError):
        return None
    subject = _cn(first.subject)
    if subject == TCB_SIGNING_CN:
        return _TCB_SIGNING_CHAIN
    if subject in PCK_CA_CNS:
        return "pck_crl_issuer_chain"
    return None


def _cn(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def check_dcap(
    quote_file: bytes, collateral: Mapping[str, bytes], *, now: datetime, platform: str
) -> EvidenceReport:
    result = dcap.verify_quote(decode_quote_text(quote_file), now=now, collateral=collateral)
    kind = "tdx" if result.quote.is_tdx else "sgx"
    if kind != platform:
        raise EvidenceError(f"this is an {kind.upper()} quote, not {platform.upper()}")
    return EvidenceReport(
        platform=platform,
        verified=True,
        claims=_hexify(result.details()),
        checks_done=list(result.checks_done),
        checks_not_done=dict(result.checks_not_done),
        registers=dict(result.registers),
    )


def check_sev_snp(
    report_file: bytes,
    certs: Sequence[bytes],
    *,
    now: datetime,
    crl: bytes | None = None,
    kds: AmdKds | None = None,
) -> EvidenceReport:
    """Verify a report with the VCEK then its chain (``certs``), and the CRL when given.

    With ``kds``, what ``certs`` lacks is fetched, and so is the CRL (the given
    ``crl`` is used when KDS has none to give).
    """
    report = _decode_text(report_file)
    vcek, chain = (certs[0] if certs else None), (b"".join(certs[1:]) or None)
    if kds is not None:
        given = {"report": report, "vcek": vcek, "cert_chain": chain, "crl": crl}
        parts = {name: data for name, data in given.items() if data is not None}
        fetched = kds.collateral_for(Evidence(platform="sev-snp", parts=parts))
        vcek, chain, crl = (
            vcek or fetched.get("vcek"),
            chain or fetched.get("cert_chain"),
            fetched.get("crl", crl),
        )
    if vcek is None:
        raise EvidenceError(
            "SEV-SNP evidence needs the VCEK (or VLEK) certificate: --certs FILE or --amd-kds"
        )
    result = sev_snp.verify_report(report, vcek, chain, now=now, crl=crl)
    return EvidenceReport(
        platform="sev-snp",
        verified=True,
        claims=_hexify(result.details()),
        checks_done=list(result.checks),
        checks_not_done=result.not_checked(),
        registers={
            "measurement": result.report.measurement,
            "host_data": result.report.host_data,
            "id_key_digest": result.report.id_key_digest,
        },
    )


@dataclass(frozen=True)
class TpmInputs:
    quote: bytes
    signature: bytes
    ak: bytes
    pcrs: bytes | None
    nonce: bytes | None
    ak_cert: bytes | None
    certs: Sequence[bytes]


def check_tpm(inputs: TpmInputs, *, now: datetime) -> EvidenceReport:
    ak = tpm_ak.load_ak(inputs.ak)
    pcrs = inputs.pcrs if inputs.pcrs is not None else b"{}"
    claims = tpm.verify_quote(inputs.quote, inputs.signature, ak, pcrs, nonce=inputs.nonce)
    done = ["quote structure", "signature by the AK", "PCR digest over the supplied PCR values"]
    not_done: dict[str, str] = {}
    if inputs.nonce is not None:
        done.append("nonce (extraData)")
    else:
        not_done["nonce"] = "no --nonce given: freshness not checked"
    if inputs.ak_cert is not None:
        certs = [c for blob in inputs.certs for c in tpm_ak.load_certificates(blob, "CA certificate")]
        roots = [c for c in certs if c.issuer == c.subject]
        intermediates = [c for c in certs if c.issuer != c.subject]
        cert = tpm_ak.load_certificates(inputs.ak_cert, "AK certificate")[0]
        tpm_ak.verify_ak_certificate(cert, ak, roots=roots, intermediates=intermediates, now=now)
        done.append("AK certificate chain to the given root")
    else:
        not_done["ak_trust"] = "no --ak-cert: nothing vouches that the AK lives in a TPM"
    registers = {f"pcr.{bank}.{i}": v for bank, values in claims.pcrs.items() for i, v in values.items()}
    return EvidenceReport(
        platform="tpm",
        verified=True,
        claims=_hexify(claims.to_dict()),
        checks_done=done,
        checks_not_done=not_done,
        registers=registers,
    )


def check_nitro(document_file: bytes, *, at: datetime | None, nonce: bytes | None) -> EvidenceReport:
    """Verify a Nitro attestation document (raw CBOR or base64) at ``at``, or at its own time.

    With ``at``, the document must also not be from after it. ``nonce``: what
    the document's nonce must be (freshness is otherwise not checked).
    """
    verified = nitro.verify_document(decode_document_text(document_file), at=at, now=at)
    document = verified.document
    done = list(verified.checks)
    not_done: dict[str, str] = {}
    if nonce is not None:
        if document.nonce != nonce:
            raise BindingError("the document's nonce is not the --nonce given")
        done.append("nonce equals --nonce")
    else:
        not_done["nonce"] = "no --nonce given: freshness not checked"
    if at is None:
        not_done["time"] = (
            f"a recorded document, checked at its own time ({document.timestamp.isoformat()});"
            " --at TIME checks it at another"
        )
    if verified.debug:
        not_done["debug"] = (
            "the enclave runs in debug mode (PCRs 0-2 all zero): its memory and console are open to the"
            " parent instance; a manifest refuses it unless it sets allow_debug = true"
        )
    return EvidenceReport(
        platform=verified.platform,
        verified=True,
        claims=_hexify(verified.details()),
        checks_done=done,
        checks_not_done=not_done,
        registers=verified.registers(),
    )


def compare_registers(report: EvidenceReport, manifest: ReferenceValues) -> None:
    """Add every mismatch between the manifest (platform, registers, TCB status, debug, guest
    policy) and the evidence. A manifest that accepts only some TCB statuses requires the TCB
    info collateral: without it the status is not evaluated and that is a mismatch."""
    report.mismatches += policy.tee_mismatches(report.platform, report.claims, manifest)
    registers = report.registers
    if manifest.platform != report.platform:
        report.mismatches.append(
            f"manifest is for platform {manifest.platform!r}, evidence is {report.platform!r}"
        )
    for name, expected in sorted(manifest.registers.items()):
        actual = registers.get(name)
        if actual is None:
            report.mismatches.append(f"register {name} is not in the evidence")
        elif actual.hex() != expected:
            report.mismatches.append(f"register {name} is {actual.hex()}, manifest expects {expected}")


def refused(platform: str, error: EnclaveError, evidence: bytes) -> EvidenceReport:
    """A refusal, with whatever the evidence says when it at least parses (unverified)."""
    report = EvidenceReport(platform=platform, verified=False, error=str(error))
    try:
        if platform in ("tdx", "sgx"):
            quote = parse_quote(decode_quote_text(evidence))
            report.claims = {"unverified": _hexify({"header": vars(quote.header), "body": vars(quote.body)})}
        elif platform == "sev-snp":
            parsed = parse_report(_decode_text(evidence))
            report.claims = {"unverified": _hexify(parsed.to_dict(Product.MILAN))}
        elif platform == "tpm":
            report.claims = {"unverified": _hexify(parse_attest(evidence).to_dict())}
        elif platform == "nitro":
            report.claims = {"unverified": parse_document(decode_document_text(evidence)).to_dict()}
    except EnclaveError:
        pass  # nothing more to show than the reason
    return report
