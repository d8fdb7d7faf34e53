"""Hardware attesters: TDX and SEV-SNP through Linux configfs-tsm, SGX through Gramine.

configfs-tsm (``/sys/kernel/config/tsm/report``): make an entry directory,
write the 64-byte report data to ``inblob``, read the signed report from
``outblob`` and, for SEV-SNP, the certificate table from ``auxblob``; the
``generation`` counter detects a concurrent writer. Gramine exposes
``/dev/attestation/user_report_data`` and ``/dev/attestation/quote``.

The TDX and SGX attesters attach to each quote the Intel collateral it needs
(TCB info, QE identity, CRLs, as ``collateral.<name>`` parts), when given a
source for it (``--pccs``): Intel signs it, so the enclave may carry it and end
users need no access to Intel. Without a source, or while it has nothing, the
quote goes alone and relying parties use their own copy.

Every root path is a parameter so tests can point it at a directory shaped
like configfs. The TDX attester extends RTMR3 with each log event where the
kernel offers a writable RTMR file; it always ships the log, so a verifier can
replay it. When an SEV-SNP report comes without certificates (the host set no
certificate table) and an AMD KDS is configured, the attester fetches the
VCEK, the ASK/ARK chain and the CRL and attaches them: they are AMD-signed, so
anyone may carry them, and every relying party checks them.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclave._daemon.errors import ConfigError
from enclave.attestation import Attester, Evidence
from enclave.attestation.dcap_freshness import attach
from enclave.collateral._http import CollateralServiceError
from enclave.collateral.amd_kds import AmdKds
from enclave.errors import EnclaveError, EvidenceError

logger = logging.getLogger(__name__)

TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
TDX_RTMR3_FILE = Path("/sys/class/misc/tdx_guest/measurements/rtmr3:sha384")
GRAMINE_ROOT = Path("/dev/attestation")
MAX_BLOB_BYTES = 64 * 1024
_ATTEMPTS = 3
_entry_numbers = itertools.count()

# The Intel collateral for a quote, by the verifiers' names (enclave.collateral.intel.IntelCollateral).
CollateralSource = Callable[[bytes], Mapping[str, bytes]]

# SEV-SNP extended-report certificate table GUIDs (AMD GHCB specification).
_VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
_VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
_ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
_ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BLOB_BYTES + 1)
    except FileNotFoundError:
        raise EvidenceError(f"{path} does not exist: is {path.parent} a configfs-tsm entry?") from None
    if len(data) > MAX_BLOB_BYTES:
        raise EvidenceError(f"{path} is larger than {MAX_BLOB_BYTES} bytes")
    return data


class ConfigfsTsm:
    """One report through configfs-tsm: fresh entry (or a given one), inblob in, outblob out."""

    def __init__(self, root: Path = TSM_REPORT_ROOT, *, entry: Path | None = None) -> None:
        self._root = root
        self._entry = entry

    def report(self, report_data: bytes) -> tuple[bytes, bytes | None, str]:
        """(outblob, auxblob or None, provider) for ``report_data``."""
        entry = self._entry or self._root / f"custos-{os.getpid()}-{next(_entry_numbers)}"
        made = self._entry is None
        if made:
            try:
                entry.mkdir()
            except OSError as exc:
                raise ConfigError(f"cannot create configfs-tsm entry {entry}: {exc.strerror}") from exc
        try:
            for _ in range(_ATTEMPTS):
                before = self._generation(entry)
                (entry / "inblob").write_bytes(report_data)
                outblob = _read(entry / "outblob")
                aux = entry / "auxblob"
                auxblob = _read(aux) if aux.exists() else None
                if self._generation(entry) == (before + 1 if before is not None else None):
                    provider = (
                        (entry / "provider").read_text().strip() if (entry / "provider").exists() else ""
                    )
                    return outblob, auxblob or None, provider
                logger.warning("configfs-tsm entry %s was written concurrently; retrying", entry)
            raise EvidenceError(f"configfs-tsm entry {entry} kept changing under us")
        finally:
            if made:
                try:
                    entry.rmdir()
                except OSError as exc:
                    logger.warning("cannot remove configfs-tsm entry %s: %s", entry, exc.strerror)

    @staticmethod
    def _generation(entry: Path) -> int | None:
        path = entry / "generation"
        return int(path.read_text().strip()) if path.exists() else None


def snp_certificates(auxblob: bytes) -> tuple[bytes | None, bytes]:
    """(VCEK or VLEK DER, PEM bundle of ASK+ARK) from an extended-report certificate table."""
    endorsement: bytes | None = None
    chain: list[bytes] = []
    offset = 0
    while offset + 24 <= len(auxblob):
        guid = uuid.UUID(bytes_le=auxblob[offset : offset + 16])
        start = int.from_bytes(auxblob[offset + 16 : offset + 20], "little")
        length = int.from_bytes(auxblob[offset + 20 : offset + 24], "little")
        offset += 24
        if guid.int == 0:
            break
        if start + length > len(auxblob):
            raise EvidenceError("SEV-SNP certificate table entry points outside the auxblob")
        der = auxblob[start : start + length]
        if guid in (_VCEK_GUID, _VLEK_GUID):
            endorsement = der
        elif guid in (_ASK_GUID, _ARK_GUID):
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError as exc:
                raise EvidenceError(f"SEV-SNP certificate table holds a bad certificate: {exc}") from exc
            chain.append(cert.public_bytes(serialization.Encoding.PEM))
    return endorsement, b"".join(chain)


class TsmAttester(Attester):
    """TDX or SEV-SNP evidence from configfs-tsm."""

    simulated = False

    def __init__(
        self,
        platform: str,
        *,
        tsm: ConfigfsTsm | None = None,
        rtmr_file: Path | None = TDX_RTMR3_FILE,
        collateral: CollateralSource | None = None,
        amd_kds: AmdKds | None = None,
    ) -> None:
        if platform not in ("tdx", "sev-snp"):
            raise ConfigError(f"configfs-tsm attests tdx or sev-snp, not {platform!r}")
        if collateral is not None and platform != "tdx":
            raise ConfigError("Intel collateral is for tdx quotes")
        self.platform = platform
        self._tsm = tsm or ConfigfsTsm()
        self._rtmr_file = rtmr_file if platform == "tdx" else None
        self._collateral = collateral
        self._amd_kds = amd_kds if platform == "sev-snp" else None

    def extend(self, event_digests: Mapping[str, bytes]) -> None:
        if self._rtmr_file is None or not self._rtmr_file.exists():
            return  # no extendable register here: the log is bound through the report data
        try:
            self._rtmr_file.write_bytes(event_digests["sha384"])
        except OSError as exc:
            raise ConfigError(f"cannot extend RTMR3 through {self._rtmr_file}: {exc.strerror}") from exc

    def collect(self, report_data: bytes) -> Evidence:
        if len(report_data) != 64:
            raise ValueError("report data must be 64 bytes")
        outblob, auxblob, provider = self._tsm.report(report_data)
        if self.platform == "tdx":
            return Evidence(platform="tdx", parts=with_collateral(outblob, self._collateral))
        parts = {"report": outblob}
        if auxblob:
            endorsement, chain = snp_certificates(auxblob)
            if endorsement is not None:
                parts["vcek"] = endorsement
            if chain:
                parts["cert_chain"] = chain
        logger.debug("SEV-SNP report from provider %s", provider or "unknown")
        if self._amd_kds is not None:
            parts.update(self._amd_collateral(parts))
        return Evidence(platform="sev-snp", parts=parts)

    def _amd_collateral(self, parts: dict[str, bytes]) -> dict[str, bytes]:
        """The VCEK and chain the report lacks, and the CRL, from AMD KDS; nothing when it fails."""
        assert self._amd_kds is not None
        try:
            return self._amd_kds.collateral_for(Evidence(platform="sev-snp", parts=parts), require_crl=False)
        except (CollateralServiceError, EvidenceError) as exc:
            logger.warning(
                "AMD collateral not attached to the evidence (%s): relying parties must fetch it", exc
            )
            return {}


class GramineAttester(Attester):
    """SGX DCAP quotes from inside a Gramine enclave (``/dev/attestation``)."""

    platform = "sgx"
    simulated = False

    def __init__(self, root: Path = GRAMINE_ROOT, *, collateral: CollateralSource | None = None) -> None:
        self._root = root
        self._collateral = collateral

    def extend(self, event_digests: Mapping[str, bytes]) -> None:
        """SGX has no register to extend after launch: the log is bound through the report data."""

    def collect(self, report_data: bytes) -> Evidence:
        if len(report_data) != 64:
            raise ValueError("report data must be 64 bytes")
        try:
            (self._root / "user_report_data").write_bytes(report_data)
            quote = _read(self._root / "quote")
        except OSError as exc:
            raise ConfigError(f"cannot use Gramine attestation at {self._root}: {exc.strerror}") from exc
        return Evidence(platform="sgx", parts=with_collateral(quote, self._collateral))


def with_collateral(quote: bytes, source: CollateralSource | None) -> dict[str, bytes]:
    """The evidence parts of a DCAP quote: the quote, and its collateral when ``source`` has it."""
    parts = {"quote": quote}
    if source is None:
        return parts
    try:
        return attach(parts, source(quote))
    except EnclaveError as exc:
        logger.warning("the quote goes without Intel collateral: %s", exc)
        return parts
