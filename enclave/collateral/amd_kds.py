"""AMD Key Distribution Service client: the VCEK, the ASK/ARK chain and the ARK-signed CRL.

Paths (AMD KDS interface specification, #57230):

* ``/vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..``
  (Turin: ``fmcSPL`` first, and an 8-byte hwid): the chip's VCEK, DER;
* ``/vcek/v1/{product}/cert_chain`` (``/vlek/v1/...`` for the ASVK): ASK then
  ARK, PEM;
* ``/vcek/v1/{product}/crl`` (``/vlek/v1/...``): the ARK-signed CRL, DER.

The product is read from the report (CPUID family and model in version 3
reports) or from the chain the report carries; a version 2 report carrying
no certificates names no product, so Milan then Genoa are asked in turn (a
VCEK from the wrong product cannot pass the verifier anyway). A VLEK cannot be
fetched by chip: KDS hands VLEKs only to the cloud provider, so a VLEK-signed
report must carry its VLEK.

The documents are kept in a :class:`~enclave.collateral.cache.CollateralCache`
under plain names: ``amd-vcek-{product}-{hwid}-{tcb}.der`` (hwid in hex, the
raw REPORTED_TCB as 16 hex digits), ``amd-cert-chain-{product}-{vcek|vlek}.pem``
and ``amd-crl-{product}-{vcek|vlek}.der``.

Nothing fetched or cached is trusted; :mod:`enclave.attestation.sev_snp` checks
it all against the pinned ARKs. The checks here only keep a wrong document out
of use and out of the cache: a VCEK must name the requested hwid and TCB, a
chain's ARK must be a pinned root, a fetched CRL must be signed by that ARK and
current.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclave.attestation.interface import Evidence
from enclave.attestation.sev_snp import ARK_SHA256, COLLATERAL_CERT_CHAIN, PART_REPORT, PART_VCEK, PLATFORM
from enclave.attestation.sev_snp_certs import (
    common_name,
    endorsement_key,
    load_certificates,
    sha256_fingerprint,
)
from enclave.attestation.sev_snp_crl import COLLATERAL_CRL, check_crl, load_crl
from enclave.attestation.sev_snp_report import Product, SigningKey, SnpReport, TcbVersion, parse_report
from enclave.collateral import _http
from enclave.collateral._http import CollateralServiceError
from enclave.collateral.cache import MAX_DOCUMENT_BYTES, CollateralCache, CollateralCacheError
from enclave.errors import EvidenceError

logger = logging.getLogger(__name__)

DEFAULT_KDS_URL = "https://kdsintf.amd.com"
_HWID_SIZE = {Product.MILAN: 64, Product.GENOA: 64, Product.TURIN: 8}
# Version 2 reports name no product; these are the products whose reports can be version 2.
_V2_PRODUCTS = (Product.MILAN, Product.GENOA)

Fetch = Callable[[str], _http.Response]
# Checks a document from KDS or the cache (raising EvidenceError) and gives the bytes to use and keep.
Accept = Callable[[bytes], bytes]


def product_from_cpuid(report: SnpReport) -> Product | None:
    """The product a version 3 report's CPUID family and model name, else None."""
    if report.version < 3:
        return None
    family, model = report.cpuid_fam_id, report.cpuid_mod_id
    if family == 0x19 and model <= 0x0F:
        return Product.MILAN
    if family == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
        return Product.GENOA
    if family == 0x1A and model <= 0x1F:
        return Product.TURIN
    raise EvidenceError(f"SEV-SNP report CPUID family {family:#x} model {model:#x} is no known AMD product")


def product_from_chain(chain: bytes) -> Product | None:
    """The product of the ASK/ASVK or ARK in a PEM bundle, by its common name."""
    for cert in load_certificates(chain, "certificate chain"):
        name = common_name(cert)
        for product in Product:
            if name in (f"SEV-{product.value}", f"SEV-VLEK-{product.value}", f"ARK-{product.value}"):
                return product
    return None


def vcek_query(product: Product, chip_id: bytes, tcb: TcbVersion) -> tuple[str, dict[str, str]]:
    """The KDS path and query for the VCEK of ``chip_id`` at ``tcb``."""
    if not any(chip_id):
        raise EvidenceError("SEV-SNP CHIP_ID is masked (zero): KDS cannot be asked for its VCEK")
    hwid = chip_id[: _HWID_SIZE[product]]
    query: dict[str, str] = {}
    if tcb.fmc is not None:
        query["fmcSPL"] = str(tcb.fmc)
    query.update(
        blSPL=str(tcb.bootloader), teeSPL=str(tcb.tee), snpSPL=str(tcb.snp), ucodeSPL=str(tcb.microcode)
    )
    return f"/vcek/v1/{product.value}/{hwid.hex()}", query


@dataclass(frozen=True)
class CacheFallback:
    """A document served from the cache because KDS could not be reached or gave no usable answer."""

    name: str  # the document's name in the cache
    error: str


class AmdKds:
    """Fetches and caches AMD's SEV-SNP collateral.

    ``cache`` (in memory when not given) keeps VCEKs and chains for good, each
    checked again when read, and each CRL until halfway between its thisUpdate
    and nextUpdate, then fetches it again. When KDS cannot be reached, a cached
    CRL is served (and ``on_fallback`` told); with nothing cached, the error is
    raised. A document larger than the cache's limit (1 MiB) is refused; one
    the cache cannot keep (a write error) is used as fetched, with a warning.
    After KDS was found unreachable it is not asked again for
    ``quiet_seconds``, so that an outage does not hold every attestation for
    the HTTP timeouts. ``roots`` replaces the pinned ARKs and exists for test
    fixtures only.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_KDS_URL,
        *,
        cache: CollateralCache | None = None,
        fetch: Fetch | None = None,
        clock: Callable[[], datetime.datetime] | None = None,
        on_fallback: Callable[[CacheFallback], None] | None = None,
        roots: Sequence[bytes] | None = None,
        quiet_seconds: float = 30.0,
    ) -> None:
        self.base_url = _http.check_base_url(base_url)
        self._quiet = datetime.timedelta(seconds=quiet_seconds)
        self._unreachable: tuple[datetime.datetime, CollateralServiceError] | None = None
        self._cache = cache if cache is not None else CollateralCache(None)
        self._fetch: Fetch = fetch or (lambda url: _http.get(url, max_bytes=MAX_DOCUMENT_BYTES))
        self._clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self._on_fallback = on_fallback
        self._roots: dict[str, Product | None]
        if roots is None:
            self._roots = {fp: p for p, fp in ARK_SHA256.items()}
        else:
            certs = [c for r in roots for c in load_certificates(r, "trusted root")]
            self._roots = {sha256_fingerprint(c): None for c in certs}

    # -- documents ---------------------------------------------------------

    def vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes:
        """The DER VCEK for ``chip_id`` at ``tcb`` (REPORTED_TCB, decoded for ``product``)."""
        path, query = vcek_query(product, chip_id, tcb)
        hwid = chip_id[: _HWID_SIZE[product]]
        name = f"amd-vcek-{product.value}-{hwid.hex()}-{tcb.raw:016x}.der"

        def accept(body: bytes) -> bytes:
            cert = load_certificates(body, "VCEK")[0]
            found = endorsement_key(cert, SigningKey.VCEK)
            if found.hwid != hwid or dict(found.tcb) != tcb.components():
                raise EvidenceError("not the VCEK of this chip at this TCB")
            return cert.public_bytes(serialization.Encoding.DER)  # KDS sends DER; a PEM answer too

        cached = self._cached(name, accept)
        if cached is not None:
            return cached
        return self._get(_http.join(self.base_url, path, query), name, accept, fallback=False)

    def cert_chain(self, product: Product, kind: SigningKey = SigningKey.VCEK) -> bytes:
        """The PEM bundle ASK (or ASVK) then ARK for ``product``."""
        name = f"amd-cert-chain-{product.value}-{_kind_path(kind)}.pem"

        def accept(body: bytes) -> bytes:
            self._trusted_ark(body, product)
            return body

        cached = self._cached(name, accept)
        if cached is not None:
            return cached
        url = _http.join(self.base_url, f"/{_kind_path(kind)}/v1/{product.value}/cert_chain")
        return self._get(url, name, accept, fallback=False)

    def crl(
        self, product: Product, kind: SigningKey = SigningKey.VCEK, *, chain: bytes | None = None
    ) -> bytes:
        """The ARK-signed CRL for ``product`` (DER), fetched again once half its validity has passed.

        ``chain`` (ASK/ASVK and ARK, PEM) names the ARK to check it with; its ARK
        must be pinned. Without it the chain is fetched (or read from the cache).
        """
        name = f"amd-crl-{product.value}-{_kind_path(kind)}.der"
        # Not checked here: the verifier checks it against the chain's ARK, and a stale one refuses.
        cached = self._cached(name, bytes)
        if cached is not None and not self._due(cached):
            return cached
        ark = self._trusted_ark(chain or self.cert_chain(product, kind), product)

        def accept(body: bytes) -> bytes:
            check_crl(body, ark=ark, revocable=(), now=self._clock())
            return body

        url = _http.join(self.base_url, f"/{_kind_path(kind)}/v1/{product.value}/crl")
        return self._get(url, name, accept, fallback=True)

    # -- what a report needs -------------------------------------------------

    def collateral_for(self, evidence: Evidence, *, require_crl: bool = True) -> dict[str, bytes]:
        """What SEV-SNP ``evidence`` lacks to be verified, plus the CRL.

        The VCEK and chain are fetched only when the evidence does not carry
        them. The CRL is always fetched (the relying party's own copy); when
        that fails and the evidence carries a CRL, or ``require_crl`` is
        false, it is left out with a warning, else the error is raised.
        """
        if evidence.platform != PLATFORM:
            return {}
        report = parse_report(evidence.part(PART_REPORT))
        kind = report.signing_key
        found: dict[str, bytes] = {}
        vcek = evidence.parts.get(PART_VCEK)
        chain = evidence.parts.get(COLLATERAL_CERT_CHAIN)
        product = product_from_cpuid(report) or (product_from_chain(chain) if chain else None)
        if product is None and vcek is not None:
            product = _product_of_endorsement(vcek, kind)
        if vcek is None:
            if kind is SigningKey.VLEK:
                raise EvidenceError(
                    "a VLEK-signed report must carry its VLEK: AMD KDS gives VLEKs to cloud providers, "
                    "not by chip"
                )
            product, found[PART_VCEK] = self._vcek_for(report, product)
        if product is None:
            raise EvidenceError("cannot tell which AMD product made this version 2 report")
        if chain is None:
            chain = found[COLLATERAL_CERT_CHAIN] = self.cert_chain(product, kind)
        try:
            found[COLLATERAL_CRL] = self.crl(product, kind, chain=chain)
        except (CollateralServiceError, EvidenceError) as exc:
            if require_crl and COLLATERAL_CRL not in evidence.parts:
                raise
            logger.warning("AMD CRL for %s not fetched (%s); %s", product.value, exc, _crl_fallback(evidence))
        return found

    def _vcek_for(self, report: SnpReport, product: Product | None) -> tuple[Product, bytes]:
        candidates = (product,) if product is not None else _V2_PRODUCTS
        for candidate in candidates:
            tcb = TcbVersion.decode(report.reported_tcb, candidate)
            try:
                return candidate, self.vcek(candidate, report.chip_id, tcb)
            except CollateralServiceError as exc:
                if exc.status != 404 or candidate is candidates[-1]:
                    raise
        raise AssertionError("unreachable: the last candidate raises")

    # -- internals -------------------------------------------------------------

    def _get(self, url: str, name: str, accept: Accept, *, fallback: bool) -> bytes:
        try:
            body = self._fetch_unless_quiet(url)
        except CollateralServiceError as exc:
            cached = self._cached(name, bytes) if fallback else None
            if cached is None:
                raise
            logger.warning("AMD KDS failed (%s): serving %s from the cache", exc, name)
            if self._on_fallback is not None:
                self._on_fallback(CacheFallback(name=name, error=str(exc)))
            return cached
        try:
            document = accept(body)
        except EvidenceError as exc:
            raise EvidenceError(f"{url}: {exc}") from None
        try:
            self._cache.write(name, document)
        except CollateralCacheError as exc:
            logger.warning("AMD %s not cached (%s); using it as fetched", name, exc)
        return document

    def _cached(self, name: str, accept: Accept) -> bytes | None:
        """The cached document, if it can be read and ``accept`` takes it; else None (logged)."""
        try:
            data = self._cache.read(name)
            return accept(data) if data is not None else None
        except CollateralCacheError as exc:
            logger.warning("AMD collateral cache not read (%s); asking KDS", exc)
        except EvidenceError as exc:
            logger.warning("ignoring the cached %s: %s", name, exc)
        return None

    def _fetch_unless_quiet(self, url: str) -> bytes:
        now = self._clock()
        if self._unreachable is not None and now < self._unreachable[0] + self._quiet:
            raise CollateralServiceError(
                f"{url}: not asked: AMD KDS was unreachable moments ago ({self._unreachable[1]})", url=url
            )
        try:
            body = self._fetch(url).body
        except CollateralServiceError as exc:
            if exc.status is None or exc.status >= 500:
                self._unreachable = (now, exc)
            raise
        self._unreachable = None
        if len(body) > MAX_DOCUMENT_BYTES:  # refused before any parsing, and more than the cache keeps
            raise CollateralServiceError(
                f"{url}: the answer exceeds {MAX_DOCUMENT_BYTES} bytes", url=url, status=200
            )
        return body

    def _trusted_ark(self, chain: bytes, product: Product) -> x509.Certificate:
        certs = load_certificates(chain, "AMD certificate chain")
        arks = [c for c in certs if common_name(c) == f"ARK-{product.value}"]
        if len(arks) != 1 or len(certs) != 2:
            raise EvidenceError(f"AMD certificate chain is not one ASK/ASVK and the ARK-{product.value}")
        fingerprint = sha256_fingerprint(arks[0])
        if fingerprint not in self._roots or self._roots[fingerprint] not in (None, product):
            raise EvidenceError(f"ARK-{product.value} (sha256 {fingerprint}) is not a trusted AMD root")
        return arks[0]

    def _due(self, cached_crl: bytes) -> bool:
        try:
            crl = load_crl(cached_crl)
        except EvidenceError:
            return True
        next_update = crl.next_update_utc
        if next_update is None:
            return True
        halfway = crl.last_update_utc + (next_update - crl.last_update_utc) / 2
        return self._clock() >= halfway


def _kind_path(kind: SigningKey) -> str:
    return "vlek" if kind is SigningKey.VLEK else "vcek"


def _product_of_endorsement(vcek: bytes, kind: SigningKey) -> Product | None:
    name = endorsement_key(load_certificates(vcek, "VCEK/VLEK")[0], kind).product_name
    for product in Product:
        if name is not None and name.split("-")[0] == product.value:
            return product
    return None


def _crl_fallback(evidence: Evidence) -> str:
    if COLLATERAL_CRL in evidence.parts:
        return "the CRL the evidence carries is checked instead"
    return "revocation will be named as not checked"
