"""The custodian's own copy of Intel's collateral, for the DCAP evidence it appraises at enrolment.

Fetched from Intel's PCS (or a PCCS, ``--pccs``) into ``DATA/collateral/intel/``
and refreshed there (:class:`enclave.collateral.intel.IntelCollateral`); or read
from a directory filled by hand on an air-gapped site (``--collateral-dir``).
The verifier uses, piece by piece, the fresher of this copy and the one the
evidence carries. While the service is unreachable the cached copy is served,
and the ``custos_custodian_collateral_stale`` gauge says so.

Fetching does blocking I/O: the enrolment calls :meth:`for_evidence` in a
worker thread. It never raises: without a copy of its own the custodian
appraises the evidence with what it carries, and says why in the log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from custodian.metrics import CustodianMetrics
from enclave.collateral.cache import CollateralCache
from enclave.collateral.intel import IntelCollateral
from enclave.collateral.intel_pcs import IntelPcs

# What the enrolment asks for the relying party's own collateral: evidence bytes in, named blobs out.
CollateralSource = Callable[[bytes], Mapping[str, bytes] | None]


class CustodianCollateral:
    def __init__(self, intel: IntelCollateral) -> None:
        self._intel = intel

    @classmethod
    def open(
        cls, data_dir: Path, metrics: CustodianMetrics, *, pccs_url: str | None, collateral_dir: Path | None
    ) -> CustodianCollateral:
        """From ``collateral_dir`` as it is, when given; else from ``pccs_url`` via DATA/collateral/intel."""

        def stale(kind: str, is_stale: bool) -> None:
            metrics.collateral_stale.labels(document=kind).set(1 if is_stale else 0)

        if collateral_dir is not None:
            cache = CollateralCache(collateral_dir, read_only=True)
            return cls(IntelCollateral(cache, None, on_stale=stale))
        cache = CollateralCache(data_dir / "collateral" / "intel")
        service = IntelPcs(pccs_url) if pccs_url is not None else None
        return cls(IntelCollateral(cache, service, on_stale=stale, authenticate=True))

    def for_evidence(self, evidence: bytes) -> Mapping[str, bytes] | None:
        """Our collateral for a DCAP quote in ``evidence``; None for other platforms or when there is none."""
        return self._intel.for_evidence(evidence)
