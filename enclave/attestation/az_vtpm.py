"""Azure confidential VMs: the vTPM's HCL report, which ties the vTPM's AK to the hardware.

On an Azure SEV-SNP or TDX confidential VM the paravisor (HCL) writes an
attestation report into vTPM NV index 0x01400001. Layout (little-endian, after
Microsoft's ``az-cvm-vtpm`` crate and "Guest attestation for confidential VMs"):

* header, 32 bytes: signature ``HCLA``, version u32, report_size u32,
  request_type u32, status u32, 12 reserved bytes;
* the hardware report, in a 1184-byte area: an SEV-SNP ``ATTESTATION_REPORT``
  (1184 bytes, REPORT_DATA at 0x50) or a TDX ``TDREPORT`` (1024 bytes,
  REPORTDATA at 128);
* IGVM request data: data_size u32, version u32, report_type u32 (2 SNP,
  4 TDX), report_data_hash_type u32 (1 SHA-256, 2 SHA-384, 3 SHA-512),
  variable_data_size u32, then the runtime data: JSON with the vTPM's keys as
  JWKs (``HCLAkPub``, ``HCLEkPub``), ``vm-configuration`` and ``user-data``.

The hardware report's REPORT_DATA starts with H(runtime data), so a hardware
report that verifies vouches for the AK named in the runtime data, and the AK
in turn signs the TPM quote. :func:`verify_az_vtpm` checks the two TPM-side
links: REPORT_DATA[0:len(H)] = H(runtime JSON), and the quote signed by
``HCLAkPub``.

``verify_az_vtpm`` checks those two links; ``complete_hardware_chain`` then
anchors the hardware report itself: the SEV-SNP report with its VCEK chain to
the AMD root, or for TDX the separate TD quote to the Intel root, matched to
this TDREPORT (whose MAC only the TDX module can check) by REPORT_DATA, MRTD
and RTMRs. Until then :class:`AzureVtpmClaims` says
``hardware_report_verified = False`` and a passing result proves only that the
quote, the AK and the runtime data are consistent with that hardware report.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from enclave.attestation import dcap, sev_snp
from enclave.attestation.tpm import PcrValues, QuoteClaims, verify_quote
from enclave.attestation.tpm_ak import AttestationKey, ak_from_jwk, json_object
from enclave.attestation.tpm_structures import TPM_ALG_RSASSA, TPM_ALG_SHA256, TpmSignature, parse_signature
from enclave.errors import BindingError, EvidenceError

MAX_HCL_REPORT_BYTES = 16 * 1024
HCL_SIGNATURE = b"HCLA"
HEADER_SIZE = 32
HW_REPORT_AREA = 1184
IGVM_HEADER_SIZE = 20
AK_KEY_ID = "HCLAkPub"

# report_type -> (name, hardware report size, REPORT_DATA offset within it)
REPORT_TYPES: Mapping[int, tuple[str, int, int]] = {2: ("snp", 1184, 0x50), 4: ("tdx", 1024, 128)}
HASH_TYPES: Mapping[int, str] = {1: "sha256", 2: "sha384", 3: "sha512"}
_REPORT_DATA_SIZE = 64


@dataclass(frozen=True)
class HclReport:
    """A parsed HCL report. Nothing in it is authenticated until the hardware report is."""

    version: int
    request_type: int
    status: int
    report_type: str  # "snp" | "tdx"
    # The SEV-SNP report or TDX TDREPORT, exactly as embedded (signature chain NOT verified here).
    hardware_report: bytes
    hash_type: str
    # The runtime data exactly as hashed into the hardware report, and its parsed JSON.
    runtime_data: bytes
    runtime_claims: Mapping[str, Any]

    @property
    def report_data(self) -> bytes:
        """The hardware report's 64-byte REPORT_DATA."""
        offset = REPORT_TYPES[_TYPE_IDS[self.report_type]][2]
        return self.hardware_report[offset : offset + _REPORT_DATA_SIZE]

    def runtime_data_digest(self) -> bytes:
        return hashlib.new(self.hash_type, self.runtime_data).digest()

    def check_binding(self) -> None:
        """REPORT_DATA must begin with H(runtime data); raises ``BindingError``."""
        digest = self.runtime_data_digest()
        if not hmac.compare_digest(self.report_data[: len(digest)], digest):
            raise BindingError(
                f"HCL runtime data is not bound to the {self.report_type} report: "
                f"REPORT_DATA does not begin with its {self.hash_type}"
            )

    def ak(self) -> AttestationKey:
        """The vTPM's attestation key: the ``HCLAkPub`` JWK of the runtime data."""
        keys = self.runtime_claims.get("keys")
        if not isinstance(keys, list):
            raise EvidenceError("HCL runtime data has no 'keys' list")
        matches = [k for k in keys if isinstance(k, dict) and k.get("kid") == AK_KEY_ID]
        if len(matches) != 1:
            raise EvidenceError(f"HCL runtime data has {len(matches)} {AK_KEY_ID} keys, expected one")
        return ak_from_jwk(matches[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "hcl_version": self.version,
            "report_type": self.report_type,
            "report_data": self.report_data.hex(),
            "runtime_data_hash": self.hash_type,
            "vm_configuration": self.runtime_claims.get("vm-configuration"),
            "user_data": self.runtime_claims.get("user-data"),
        }


_TYPE_IDS = {name: report_type for report_type, (name, _, _) in REPORT_TYPES.items()}


def parse_hcl_report(data: bytes) -> HclReport:
    """Parse an HCL report; the binding and the hardware report are not checked here."""
    if len(data) > MAX_HCL_REPORT_BYTES:
        raise EvidenceError(f"HCL report is {len(data)} bytes, over the {MAX_HCL_REPORT_BYTES}-byte limit")
    raw = bytes(data)
    fixed = HEADER_SIZE + HW_REPORT_AREA + IGVM_HEADER_SIZE
    if len(raw) < fixed:
        raise EvidenceError(f"HCL report is {len(raw)} bytes, shorter than its {fixed}-byte fixed part")
    if raw[:4] != HCL_SIGNATURE:
        raise EvidenceError(f"HCL report signature is {raw[:4]!r}, expected {HCL_SIGNATURE!r}")

    def u32(offset: int) -> int:
        return int.from_bytes(raw[offset : offset + 4], "little")

    igvm = HEADER_SIZE + HW_REPORT_AREA
    report_type, hash_type, var_size = u32(igvm + 8), u32(igvm + 12), u32(igvm + 16)
    known_type = REPORT_TYPES.get(report_type)
    if known_type is None:
        raise EvidenceError(f"HCL report_type {report_type} is neither SNP (2) nor TDX (4)")
    hash_name = HASH_TYPES.get(hash_type)
    if hash_name is None:
        raise EvidenceError(f"HCL report_data_hash_type {hash_type} is not SHA-256, SHA-384 or SHA-512")
    if var_size > len(raw) - fixed:
        raise EvidenceError(
            f"HCL variable_data_size is {var_size}, but only {len(raw) - fixed} bytes follow the header"
        )
    runtime_data = raw[fixed : fixed + var_size]
    return HclReport(
        version=u32(4),
        request_type=u32(12),
        status=u32(16),
        report_type=known_type[0],
        hardware_report=raw[HEADER_SIZE : HEADER_SIZE + known_type[1]],
        hash_type=hash_name,
        runtime_data=runtime_data,
        runtime_claims=json_object(runtime_data, "HCL runtime data"),
    )


@dataclass(frozen=True)
class AzureVtpmClaims:
    """An Azure vTPM quote verified with the AK that the HCL report's runtime data names."""

    hcl: HclReport
    quote: QuoteClaims
    # True once ``complete_hardware_chain`` has anchored the hardware report to AMD or Intel.
    hardware_report_verified: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.hcl.to_dict(),
            **self.quote.to_dict(),
            "hardware_report_verified": self.hardware_report_verified,
        }


def verify_az_vtpm(
    hcl_report: bytes,
    quote: bytes,
    signature: bytes,
    pcrs: bytes | PcrValues,
    *,
    nonce: bytes | None = None,
) -> AzureVtpmClaims:
    """Check the HCL binding, then the quote with ``HCLAkPub``.

    ``signature`` is either a ``TPMT_SIGNATURE`` or, as Azure tooling saves it,
    the bare RSA signature (exactly the AK's modulus length), which is then
    RSASSA-PKCS1-v1_5 with SHA-256. The hardware report itself is NOT verified
    (see the module documentation).
    """
    hcl = parse_hcl_report(hcl_report)
    hcl.check_binding()
    ak = hcl.ak()
    sig: bytes | TpmSignature = signature
    if isinstance(ak.key, rsa.RSAPublicKey) and len(signature) == (ak.key.key_size + 7) // 8:
        sig = TpmSignature(sig_alg=TPM_ALG_RSASSA, hash_alg=TPM_ALG_SHA256, signature=bytes(signature))
    else:
        sig = parse_signature(signature)
    return AzureVtpmClaims(hcl=hcl, quote=verify_quote(quote, sig, ak, pcrs, nonce=nonce))


# TDREPORT: REPORTMACSTRUCT (256) | TEE_TCB_INFO (239) | reserved (17) | TDINFO: ATTRIBUTES (8),
# XFAM (8), MRTD (48), MRCONFIGID, MROWNER, MROWNERCONFIG (48 each), RTMR0..3 (48 each).
_TDINFO = 512
_TDINFO_FIELDS = (("mrtd", _TDINFO + 16), *((f"rtmr{i}", _TDINFO + 16 + 4 * 48 + i * 48) for i in range(4)))


def complete_hardware_chain(
    claims: AzureVtpmClaims,
    *,
    now: datetime,
    snp_vcek: bytes | None = None,
    snp_chain: bytes | None = None,
    td_quote: bytes | None = None,
    dcap_collateral: Mapping[str, bytes] | None = None,
) -> AzureVtpmClaims:
    """Anchor the HCL report's hardware report to the vendor root.

    SEV-SNP: the embedded report is verified with its VCEK chain to the pinned
    AMD ARK. TDX: the TDREPORT cannot be verified outside the TD, so the TD quote
    Azure publishes beside it is verified to the Intel root and must carry the
    same REPORT_DATA and MRTD/RTMRs as the embedded TDREPORT.
    """
    hcl = claims.hcl
    if hcl.report_type == "snp":
        if snp_vcek is None:
            raise EvidenceError("completing an SEV-SNP HCL report needs its VCEK")
        sev_snp.verify_report(hcl.hardware_report, snp_vcek, snp_chain, now=now)
    else:
        if td_quote is None:
            raise EvidenceError("completing a TDX HCL report needs the TD quote")
        verified = dcap.verify_quote(td_quote, now=now, collateral=dcap_collateral)
        body = verified.quote.body
        if not verified.quote.is_tdx or not hmac.compare_digest(
            getattr(body, "reportdata", b""), hcl.report_data
        ):
            raise BindingError("the TD quote's REPORT_DATA does not match the HCL report's TDREPORT")
        for name, offset in _TDINFO_FIELDS:
            if getattr(body, name) != hcl.hardware_report[offset : offset + 48]:
                raise BindingError(f"the TD quote's {name.upper()} is not the HCL report's")
    return replace(claims, hardware_report_verified=True)
