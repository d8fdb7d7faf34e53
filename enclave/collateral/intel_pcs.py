"""A client for Intel's Provisioning Certification Service API v4 (and any PCCS that serves it).

The documents a DCAP quote needs, fetched as the service sends them:

- ``GET {base}/{sgx|tdx}/certification/v4/tcb?fmspc=FMSPC``: TCB info, issuer
  chain in the ``TCB-Info-Issuer-Chain`` header;
- ``GET {base}/{sgx|tdx}/certification/v4/qe/identity``: the QE (SGX) or TD QE
  (TDX) identity, issuer chain in ``SGX-Enclave-Identity-Issuer-Chain``;
- ``GET {base}/sgx/certification/v4/pckcrl?ca=platform|processor&encoding=der``:
  the PCK CA's CRL, issuer chain in ``SGX-PCK-CRL-Issuer-Chain``;
- ``GET {base}/sgx/certification/v4/rootcacrl``: the Intel SGX Root CA CRL.

Issuer chains arrive URL-encoded (PEM); they are decoded here. Nothing is
verified here: :mod:`enclave.attestation.dcap` checks every document against
the Intel SGX Root CA pinned in code. :func:`quote_needs` reads, without
verifying, which documents a quote needs (TDX or SGX, FMSPC, which PCK CA).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from enclave.attestation.dcap_pck import load_certificate_chain_pem, pck_certificate
from enclave.attestation.dcap_quote import parse_quote
from enclave.collateral import _http
from enclave.collateral._http import CollateralServiceError
from enclave.errors import EvidenceError

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
MAX_DOCUMENT_BYTES = 512 * 1024
MAX_ISSUER_CHAIN_BYTES = 16 * 1024

Tee = Literal["sgx", "tdx"]
PckCa = Literal["platform", "processor"]
_CA_BY_CN: dict[str, PckCa] = {
    "Intel SGX PCK Platform CA": "platform",
    "Intel SGX PCK Processor CA": "processor",
}

__all__ = [
    "INTEL_PCS_URL",
    "CollateralServiceError",
    "IntelPcs",
    "PcsDocument",
    "QuoteNeeds",
    "pccs_argument",
    "quote_needs",
]


# The value of a ``--pccs`` flag: a PCS or PCCS base URL, or ``off`` (None: fetch nothing).
pccs_argument = _http.service_url_argument


@dataclass(frozen=True)
class QuoteNeeds:
    """Which collateral documents a quote needs: its TEE, its platform's FMSPC and its PCK CA."""

    tee: Tee
    fmspc: str  # 12 upper-case hex digits, as PCS spells it
    ca: PckCa


def quote_needs(quote: bytes) -> QuoteNeeds:
    """Read the quote's TEE type and its PCK certificate's FMSPC and issuer; verifies nothing."""
    parsed = parse_quote(quote)
    chain = load_certificate_chain_pem(parsed.pck_chain_pem, "PCK certificate chain")
    pck = pck_certificate(chain)
    ca = _CA_BY_CN.get(pck.ca_name)
    if ca is None:
        raise EvidenceError(f"the quote's PCK certificate is issued by {pck.ca_name!r}, not a PCK CA")
    return QuoteNeeds(tee="tdx" if parsed.is_tdx else "sgx", fmspc=pck.fmspc.hex().upper(), ca=ca)


@dataclass(frozen=True)
class PcsDocument:
    """A document as the service sent it, and the issuer chain (PEM) from its header, if any."""

    body: bytes
    issuer_chain: bytes | None = None


Getter = Callable[[str], _http.Response]


class IntelPcs:
    """The PCS v4 API at ``base_url`` (Intel's public service by default, or a PCCS)."""

    def __init__(
        self,
        base_url: str = INTEL_PCS_URL,
        *,
        timeout: float = _http.DEFAULT_TIMEOUT_SECONDS,
        attempts: int = _http.DEFAULT_ATTEMPTS,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.base_url = _http.check_base_url(base_url)
        self._timeout = timeout
        self._attempts = attempts
        self._sleep = sleep

    def tcb_info(self, tee: Tee, fmspc: str) -> PcsDocument:
        if len(fmspc) != 12 or any(c not in "0123456789abcdefABCDEF" for c in fmspc):
            raise ValueError(f"an FMSPC is 12 hex digits, not {fmspc[:40]!r}")
        return self._get(f"{tee}/certification/v4/tcb", {"fmspc": fmspc.upper()}, "TCB-Info-Issuer-Chain")

    def qe_identity(self, tee: Tee) -> PcsDocument:
        return self._get(f"{tee}/certification/v4/qe/identity", None, "SGX-Enclave-Identity-Issuer-Chain")

    def pck_crl(self, ca: PckCa) -> PcsDocument:
        query = {"ca": ca, "encoding": "der"}
        return self._get("sgx/certification/v4/pckcrl", query, "SGX-PCK-CRL-Issuer-Chain")

    def root_ca_crl(self) -> PcsDocument:
        return self._get("sgx/certification/v4/rootcacrl", None, None)

    def _get(self, path: str, query: dict[str, str] | None, chain_header: str | None) -> PcsDocument:
        url = _http.join(self.base_url, path, query)
        extra = {"sleep": self._sleep} if self._sleep is not None else {}
        reply = _http.get(
            url, timeout=self._timeout, attempts=self._attempts, max_bytes=MAX_DOCUMENT_BYTES, **extra
        )
        if not reply.body:
            raise CollateralServiceError(f"{url}: the answer is empty", url=url)
        if chain_header is None:
            return PcsDocument(body=reply.body)
        encoded = reply.header(chain_header)
        if not encoded:
            raise CollateralServiceError(f"{url}: the answer has no {chain_header} header", url=url)
        chain = urllib.parse.unquote_to_bytes(encoded)
        if len(chain) > MAX_ISSUER_CHAIN_BYTES or b"-----BEGIN CERTIFICATE-----" not in chain:
            raise CollateralServiceError(f"{url}: the {chain_header} header is not a PEM chain", url=url)
        return PcsDocument(body=reply.body, issuer_chain=chain)
