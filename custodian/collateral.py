"""The custodian's own copy of the vendors' collateral, for the evidence it appraises at enrolment.

Intel's (tdx, sgx) is fetched from Intel's PCS (or a PCCS, ``--pccs``) into
``DATA/collateral/intel/`` and refreshed there
(:class:`enclave.collateral.intel.IntelCollateral`), or read from a directory
filled by hand on an air-gapped site (``--collateral-dir``). The verifier uses,
piece by piece, the fresher of this copy and the one the evidence carries.
While the service is unreachable the cached copy is served, and the
``custos_custodian_collateral_stale`` gauge says so; without a copy of its own
the custodian appraises the evidence with what it carries, and says why in the
log.

AMD's (sev-snp: VCEK, chain, CRL) comes from AMD's KDS (``--amd-kds``),
cached under ``DATA/collateral/amd/`` (``amd-vcek-*.der``, ``amd-cert-chain-*.pem``,
``amd-crl-*.der``: :mod:`enclave.collateral.amd_kds`); the CRL is served from the
cache while KDS is unreachable (``custos_custodian_collateral_cache_fallbacks_total``),
and with no CRL to be had at all the enrolment is refused (reason ``collateral``).

Fetching does blocking I/O: the enrolment calls :meth:`for_evidence` in a
worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from custodian.metrics import CustodianMetrics
from enclave.attestation import Evidence
from enclave.collateral.amd_kds import AmdKds
from enclave.collateral.cache import CollateralCache
from enclave.collateral.intel import IntelCollateral
from enclave.collateral.intel_pcs import IntelPcs

# What the enrolment asks for the relying party's own collateral: evidence bytes in, named blobs out.
CollateralSource = Callable[[bytes], Mapping[str, bytes] | None]


class CustodianCollateral:
    def __init__(self, intel: IntelCollateral, amd: AmdKds | None = None) -> None:
        self._intel = intel
        self._amd = amd

    @classmethod
    def open(
        cls,
        data_dir: Path,
        metrics: CustodianMetrics,
        *,
        pccs_url: str | None,
        collateral_dir: Path | None,
        amd_kds_url: str | None = None,
    ) -> CustodianCollateral:
        """Intel's from ``collateral_dir`` as it is, when given, else from ``pccs_url`` via
        DATA/collateral/intel; AMD's from ``amd_kds_url`` via DATA/collateral/amd (None: none)."""
        amd = None
        if amd_kds_url is not None:
            fallbacks = metrics.collateral_cache_fallbacks.labels("amd")
            amd = AmdKds(
                amd_kds_url,
                cache=CollateralCache(data_dir / "collateral" / "amd"),
                on_fallback=lambda _: fallbacks.inc(),
            )

        def stale(kind: str, is_stale: bool) -> None:
            metrics.collateral_stale.labels(document=kind).set(1 if is_stale else 0)

        if collateral_dir is not None:
            cache = CollateralCache(collateral_dir, read_only=True)
            return cls(IntelCollateral(cache, None, on_stale=stale), amd)
        cache = CollateralCache(data_dir / "collateral" / "intel")
        service = IntelPcs(pccs_url) if pccs_url is not None else None
        return cls(IntelCollateral(cache, service, on_stale=stale, authenticate=True), amd)

    def for_evidence(self, evidence: bytes) -> Mapping[str, bytes] | None:
        """Our collateral for the DCAP quote or SEV-SNP report in ``evidence``; None for other platforms
        or when there is none. Raises ``CollateralServiceError`` for a SEV-SNP report whose CRL can be
        neither fetched nor found in the cache."""
        if self._amd is not None:
            parsed = Evidence.from_bytes(evidence)
            if parsed.platform == "sev-snp":
                return self._amd.collateral_for(parsed)
        return self._intel.for_evidence(evidence)
