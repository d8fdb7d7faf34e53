"""The Intel collateral a DCAP quote needs, from a cache kept fresh from PCS (or a PCCS), or a directory.

For a quote, :meth:`IntelCollateral.for_quote` returns the named blobs the
verifiers take (``tcb_info``, ``qe_identity``, ``pck_crl``, ``root_ca_crl`` and
their issuer chains). Each document is stored as the service sent it, in the
cache (:mod:`enclave.collateral.cache`), under a name keyed by TEE and FMSPC
or by CA::

    tdx-tcb-00806F050000.json   tdx-tcb-00806F050000.issuer-chain.pem
    tdx-qe-identity.json        tdx-qe-identity.issuer-chain.pem
    pckcrl-platform.der         pckcrl-platform.issuer-chain.pem
    rootcacrl.der

(``sgx-`` for SGX). A cached document is fetched again once it is
``max_age`` old (Intel reissues its collateral daily) or reaches its
``nextUpdate``, at most once per ``retry_after`` when that fails. While the
service is unreachable the cached copy is served, with a warning in the log
and through ``on_stale``; a verifier then refuses it once it has expired. A
fetched document is kept only if it is the one asked for (TEE, FMSPC, CA) and
not older than the cached copy (a service cannot roll the cache back).

Air-gapped sites fill a directory with these files by hand; ``IntelCollateral``
without a service only reads it. Nothing here checks a signature: the
verifiers check every document against the Intel SGX Root CA pinned in code.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.exceptions import InvalidSignature

from enclave.attestation import dcap
from enclave.attestation.dcap_collateral import check_crl, load_crl, parse_collateral, verify_signed_document
from enclave.attestation.dcap_freshness import (
    Currency,
    carried_collateral,
    crl_currency,
    signed_document_currency,
)
from enclave.attestation.dcap_pck import (
    PCK_CA_CNS,
    common_name,
    load_certificate_chain_pem,
    load_certificate_der,
)
from enclave.attestation.interface import Evidence
from enclave.collateral.cache import CollateralCache
from enclave.collateral.intel_pcs import IntelPcs, PcsDocument, QuoteNeeds, quote_needs
from enclave.errors import EnclaveError

logger = logging.getLogger(__name__)

DEFAULT_MAX_AGE = timedelta(hours=24)
DEFAULT_RETRY_AFTER = timedelta(minutes=5)
# What on_stale reports, and a metric's label values: one per kind of document.
DOCUMENT_KINDS = ("tcb_info", "qe_identity", "pck_crl", "root_ca_crl")
DCAP_PLATFORMS = ("tdx", "sgx")
# Evidence carrying all of these needs nothing more for every check (pck_crl_issuer_chain is optional).
COMPLETE = frozenset(
    {"tcb_info", "tcb_info_issuer_chain", "qe_identity", "qe_identity_issuer_chain", "pck_crl", "root_ca_crl"}
)


class CollateralUnavailableError(EnclaveError):
    """Neither the service nor the cache has a usable copy of a document."""


@dataclass(frozen=True)
class _Spec:
    kind: str  # one of DOCUMENT_KINDS, also the verifier's collateral name
    file: str
    chain_file: str | None
    fetch: Callable[[], PcsDocument]
    expect: Callable[[bytes], str | None]  # why the body is not the document asked for, or None


@dataclass(frozen=True)
class _Copy:
    document: PcsDocument
    currency: Currency


class IntelCollateral:
    def __init__(
        self,
        cache: CollateralCache,
        pcs: IntelPcs | None,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_age: timedelta = DEFAULT_MAX_AGE,
        retry_after: timedelta = DEFAULT_RETRY_AFTER,
        on_stale: Callable[[str, bool], None] | None = None,
        authenticate: bool = False,
    ) -> None:
        self.cache = cache
        self._authenticate = authenticate
        self.pcs = pcs
        self._now = now
        self._max_age = max_age
        self._retry_after = retry_after
        self._on_stale = on_stale
        self._last_attempt: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def for_quote(self, quote: bytes) -> dict[str, bytes]:
        """The collateral for ``quote``, by the verifiers' names. Raises ``CollateralUnavailableError``."""
        needs = quote_needs(quote)
        out: dict[str, bytes] = {}
        with self._lock:
            for spec in self._specs(needs):
                copy = self._document(spec)
                out[spec.kind] = copy.document.body
                if copy.document.issuer_chain is not None:
                    out[f"{spec.kind}_issuer_chain"] = copy.document.issuer_chain
        return out

    def for_evidence(self, evidence: bytes, *, unless_carried: bool = False) -> dict[str, bytes] | None:
        """Our collateral for the DCAP quote in ``evidence`` (serialized); None for another platform,
        when ``unless_carried`` and the evidence carries a complete set, or when there is none
        (logged: the verifier then has what the evidence carries). Never raises."""
        try:
            parsed = Evidence.from_bytes(evidence)
            if parsed.platform not in DCAP_PLATFORMS:
                return None
            if unless_carried and COMPLETE <= set(carried_collateral(parsed.parts)):
                return None
            return self.for_quote(parsed.part("quote"))
        except EnclaveError as exc:
            logger.warning("no Intel collateral of our own for this evidence: %s", exc)
            return None

    def _specs(self, needs: QuoteNeeds) -> list[_Spec]:
        tee, fmspc, ca = needs.tee, needs.fmspc, needs.ca
        pcs = self.pcs
        qe_id = "TD_QE" if tee == "tdx" else "QE"
        return [
            _Spec(
                "tcb_info",
                f"{tee}-tcb-{fmspc}.json",
                f"{tee}-tcb-{fmspc}.issuer-chain.pem",
                lambda: _need(pcs).tcb_info(tee, fmspc),
                lambda body: _expect_json(body, "tcbInfo", id=tee.upper(), fmspc=fmspc),
            ),
            _Spec(
                "qe_identity",
                f"{tee}-qe-identity.json",
                f"{tee}-qe-identity.issuer-chain.pem",
                lambda: _need(pcs).qe_identity(tee),
                lambda body: _expect_json(body, "enclaveIdentity", id=qe_id),
            ),
            _Spec(
                "pck_crl",
                f"pckcrl-{ca}.der",
                f"pckcrl-{ca}.issuer-chain.pem",
                lambda: _need(pcs).pck_crl(ca),
                lambda body: None,
            ),
            _Spec("root_ca_crl", "rootcacrl.der", None, lambda: _need(pcs).root_ca_crl(), lambda body: None),
        ]

    def _document(self, spec: _Spec) -> _Copy:
        cached = self._cached(spec)
        now = self._now()
        if cached is not None and not self._due(cached.currency, now):
            return cached
        if self.pcs is None:
            if cached is None:
                raise CollateralUnavailableError(
                    f"no {spec.file} in the collateral directory {self.cache.directory}"
                )
            return cached  # air-gapped: the verifier judges whether it has expired
        last = self._last_attempt.get(spec.file)
        if last is not None and now < last + self._retry_after:
            if cached is None:  # a service that just failed is not asked again at every quote
                raise CollateralUnavailableError(
                    f"{spec.kind}: the last fetch failed; retrying after {last + self._retry_after:%H:%M:%S}"
                )
            return cached
        self._last_attempt[spec.file] = now
        try:
            fetched = self._fetch(spec)
        except EnclaveError as exc:
            if cached is None:
                raise CollateralUnavailableError(f"{spec.kind}: {exc}; and no cached copy") from exc
            logger.warning(
                "serving the cached %s (issued %s, next update %s): %s",
                spec.file,
                cached.currency.issued.isoformat(),
                cached.currency.next_update.isoformat(),
                exc,
            )
            self._stale(spec.kind, True)
            return cached
        self._stale(spec.kind, False)
        if cached is not None and fetched.currency.rank < cached.currency.rank:
            logger.warning(
                "the service sent an older %s than the cached one; keeping the cached copy", spec.file
            )
            return cached
        if not self.cache.read_only:
            if spec.chain_file is not None and fetched.document.issuer_chain is not None:
                self.cache.write(spec.chain_file, fetched.document.issuer_chain)
            self.cache.write(spec.file, fetched.document.body)
        return fetched

    def _due(self, currency: Currency, now: datetime) -> bool:
        return now >= min(currency.issued + self._max_age, currency.next_update)

    def _fetch(self, spec: _Spec) -> _Copy:
        document = spec.fetch()
        wrong = spec.expect(document.body)
        if wrong is not None:
            raise CollateralUnavailableError(f"the service answered with the wrong {spec.kind}: {wrong}")
        currency = _currency(spec, document)
        if currency is None:
            raise CollateralUnavailableError(f"the service's {spec.kind} does not parse")
        if self._authenticate:
            _check_signature(spec.kind, document, self._now())
        return _Copy(document, currency)

    def _cached(self, spec: _Spec) -> _Copy | None:
        body = self.cache.read(spec.file)
        if body is None:
            return None
        chain = self.cache.read(spec.chain_file) if spec.chain_file is not None else None
        document = PcsDocument(body=body, issuer_chain=chain)
        currency = _currency(spec, document) if spec.expect(body) is None else None
        if currency is None:
            logger.warning("ignoring the cached %s: it is not the document it should be", spec.file)
            return None
        return _Copy(document, currency)

    def _stale(self, kind: str, stale: bool) -> None:
        if self._on_stale is not None:
            self._on_stale(kind, stale)


def _check_signature(kind: str, document: PcsDocument, now: datetime) -> None:
    """A document signed under the pinned Intel SGX Root CA, before it may replace the cached copy:
    a forged one with a high evaluation number or a late date would otherwise hold the cache."""
    root = load_certificate_der(dcap.INTEL_SGX_ROOT_CA_DER, "Intel SGX Root CA")
    blobs = {kind: document.body}
    if document.issuer_chain is not None and kind != "pck_crl":
        blobs[f"{kind}_issuer_chain"] = document.issuer_chain
    parsed = parse_collateral(blobs)
    signed = parsed.tcb_info or parsed.qe_identity
    if signed is not None:
        verify_signed_document(signed, root, now)
    elif parsed.root_ca_crl is not None:
        check_crl(load_crl(parsed.root_ca_crl, kind), root, kind)
    elif parsed.pck_crl is not None:
        chain = load_certificate_chain_pem(document.issuer_chain or b"", f"{kind} issuer chain")
        if not chain or common_name(chain[0]) not in PCK_CA_CNS:
            raise CollateralUnavailableError(f"the {kind} issuer chain does not start with a PCK CA")
        try:
            chain[0].verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            raise CollateralUnavailableError(
                f"the {kind} issuer is not issued by the Intel SGX Root CA"
            ) from None
        check_crl(load_crl(parsed.pck_crl, kind), chain[0], kind)


def _need(pcs: IntelPcs | None) -> IntelPcs:
    if pcs is None:  # _document never fetches without a service
        raise CollateralUnavailableError("no collateral service configured")
    return pcs


def _currency(spec: _Spec, document: PcsDocument) -> Currency | None:
    if spec.chain_file is not None and document.issuer_chain is None:
        return None
    blobs = {spec.kind: document.body}
    if spec.kind in ("tcb_info", "qe_identity"):
        blobs[f"{spec.kind}_issuer_chain"] = document.issuer_chain or b""
    try:
        parsed = parse_collateral(blobs)
    except EnclaveError:
        return None
    if parsed.tcb_info is not None:
        return signed_document_currency(parsed.tcb_info)
    if parsed.qe_identity is not None:
        return signed_document_currency(parsed.qe_identity)
    der = parsed.pck_crl if parsed.pck_crl is not None else parsed.root_ca_crl
    return crl_currency(der) if der is not None else None


def _expect_json(body: bytes, key: str, **fields: str) -> str | None:
    try:
        inner = json.loads(body)[key]
    except (ValueError, KeyError, TypeError):
        return f"no {key!r} object"
    if not isinstance(inner, dict):
        return f"{key!r} is not an object"
    for name, wanted in fields.items():
        value = inner.get(name)
        if not isinstance(value, str) or value.upper() != wanted.upper():
            return f"{key}.{name} is {value!r}, expected {wanted!r}"
    return None
