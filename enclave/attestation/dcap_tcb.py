"""TCB status of a DCAP quote: platform TCB level, TDX module identity, QE identity.

Follows Intel's Quote Verification Library (``TcbLevelCheck.cpp``,
``TdxModuleCheck.cpp``): the platform level is the first ``tcbLevel`` (Intel
orders them newest first) whose 16 SGX components and PCESVN are at or below
the PCK certificate's and, for TDX, whose ``tdxtcbcomponents`` are at or below
the quote's TEE_TCB_SVN (components 0 and 1 are skipped when TEE_TCB_SVN[1],
the TDX module major version, is not 0: the module identity grades those).
The TDX module identity (``tdxModule``, or ``tdxModuleIdentities["TDX_%02X"]``)
and the QE identity must match; their TCB levels fold into the overall status
the way Intel's ``converge*`` functions do. "No matching TCB level" and a
Revoked status are refusals; every other status is reported.

Not implemented: Intel's TD relaunch advice for TDX 1.5 bodies (TEE_TCB_SVN2
against the module identities), which can only refine UpToDate or
ConfigurationNeeded into TDRelaunchAdvised[ConfigurationNeeded].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from enclave.attestation.dcap_pck import PckCertificate
from enclave.attestation.dcap_quote import EnclaveReport, TdReport
from enclave.attestation.dcap_tcb_info import TCB_STATUSES, EnclaveIdentity, IdentityLevel, TcbInfo, TcbLevel
from enclave.errors import EvidenceError

OUT_OF_DATE = "OutOfDate"
REVOKED = "Revoked"
# Statuses that are not refusals: the relying party decides (see the Verifier classes).
NON_TERMINAL_STATUSES = tuple(status for status in TCB_STATUSES if status != REVOKED)


@dataclass(frozen=True)
class TcbAssessment:
    """The TCB status of one quote against its collateral."""

    # The overall status: platform level folded with TDX module and QE identity; None without TCB info.
    status: str | None
    platform: TcbLevel | None  # None when no TCB info was given
    tdx_module: IdentityLevel | None  # None for SGX, TDX module major version 0, or no TCB info
    qe: IdentityLevel | None  # None when no QE identity was given

    @property
    def advisory_ids(self) -> tuple[str, ...]:
        ids: list[str] = []
        for level in (self.platform, self.tdx_module, self.qe):
            if level is not None:
                ids += level.advisory_ids
        return tuple(sorted(set(ids)))

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tcb_status": self.status, "advisory_ids": list(self.advisory_ids)}
        if self.platform is not None:
            out["platform_tcb"] = _level_details(self.platform.status, self.platform.tcb_date, self.platform)
        if self.tdx_module is not None:
            out["tdx_module_tcb"] = _level_details(
                self.tdx_module.status, self.tdx_module.tcb_date, self.tdx_module
            )
        if self.qe is not None:
            out["qe_identity_tcb"] = _level_details(self.qe.status, self.qe.tcb_date, self.qe)
        return out


def _level_details(status: str, date: str, level: TcbLevel | IdentityLevel) -> dict[str, Any]:
    return {"status": status, "tcb_date": date, "advisory_ids": list(level.advisory_ids)}


def platform_tcb_level(tcb_info: TcbInfo, pck: PckCertificate, td: TdReport | None) -> TcbLevel:
    """The first TCB level the platform meets; "no matching TCB level" is an ``EvidenceError``."""
    skip = 2 if td is not None and td.tee_tcb_svn[1] > 0 else 0
    for level in tcb_info.levels:
        if pck.pcesvn < level.pcesvn:
            continue
        if any(have < need for have, need in zip(pck.sgx_tcb_components, level.sgx_components, strict=True)):
            continue
        if td is not None:
            if level.tdx_components is None:
                continue
            pairs = list(zip(td.tee_tcb_svn, level.tdx_components, strict=True))[skip:]
            if any(have < need for have, need in pairs):
                continue
        return level
    svn = f", TEE_TCB_SVN {td.tee_tcb_svn.hex()}" if td is not None else ""
    raise EvidenceError(
        f"no matching TCB level: the platform (PCK SGX TCB {list(pck.sgx_tcb_components)}, "
        f"PCESVN {pck.pcesvn}{svn}) is below every level of the TCB info for FMSPC {tcb_info.fmspc.hex()}"
    )


def tdx_module_level(tcb_info: TcbInfo, td: TdReport) -> IdentityLevel | None:
    """Check MRSIGNERSEAM and SEAMATTRIBUTES against the TCB info's TDX module identity.

    With module major version (TEE_TCB_SVN[1]) 0 the ``tdxModule`` entry applies
    and has no TCB levels (returns ``None``); otherwise ``tdxModuleIdentities``
    must hold ``TDX_%02X`` and a level at or below the module SVN (TEE_TCB_SVN[0]).
    """
    isvsvn, major = td.tee_tcb_svn[0], td.tee_tcb_svn[1]
    level: IdentityLevel | None = None
    expected = tcb_info.tdx_module
    if major > 0:
        wanted = f"TDX_{major:02X}"
        found = [m for m in tcb_info.tdx_module_identities if m.id.upper() == wanted]
        if not found:
            raise EvidenceError(f"TDX module mismatch: the TCB info has no TDX module identity {wanted}")
        expected = found[0]
        level = next((lv for lv in expected.levels if isvsvn >= lv.isvsvn), None)
        if level is None:
            raise EvidenceError(f"no matching TDX module TCB level for {wanted} with module SVN {isvsvn}")
    if expected is None:
        raise EvidenceError("TDX module mismatch: the TCB info has no tdxModule")
    if td.mrsignerseam != expected.mrsigner:
        raise EvidenceError(
            f"TDX module mismatch: MRSIGNERSEAM {td.mrsignerseam.hex()} is not {expected.mrsigner.hex()}"
        )
    mask = expected.attributes_mask
    if _and(td.seam_attributes, mask) != _and(expected.attributes, mask):
        raise EvidenceError(
            f"TDX module mismatch: SEAMATTRIBUTES {td.seam_attributes.hex()} do not match "
            f"{expected.attributes.hex()} under mask {mask.hex()}"
        )
    return level


def qe_identity_level(identity: EnclaveIdentity, qe: EnclaveReport, *, tdx: bool) -> IdentityLevel:
    """Check the QE report against the QE identity; return the QE's TCB level."""
    wanted = "TD_QE" if tdx else "QE"
    if identity.id != wanted:
        raise EvidenceError(
            f"qe_identity is for {identity.id!r}, a {'TDX' if tdx else 'SGX'} quote needs {wanted!r}"
        )
    if qe.mrsigner != identity.mrsigner:
        raise EvidenceError(
            f"QE identity mismatch: MRSIGNER {qe.mrsigner.hex()} is not {identity.mrsigner.hex()}"
        )
    if qe.isvprodid != identity.isvprodid:
        raise EvidenceError(f"QE identity mismatch: ISVPRODID {qe.isvprodid} is not {identity.isvprodid}")
    mask = identity.miscselect_mask
    if qe.miscselect_value & mask != identity.miscselect & mask:
        raise EvidenceError(f"QE identity mismatch: MISCSELECT {qe.miscselect_value:#010x}")
    if _and(qe.attributes, identity.attributes_mask) != _and(identity.attributes, identity.attributes_mask):
        raise EvidenceError(f"QE identity mismatch: ATTRIBUTES {qe.attributes.hex()}")
    level = next((lv for lv in identity.levels if qe.isvsvn >= lv.isvsvn), None)
    if level is None:
        raise EvidenceError(f"no matching QE identity TCB level for QE ISVSVN {qe.isvsvn}")
    return level


def assess(
    platform: TcbLevel | None, tdx_module: IdentityLevel | None, qe: IdentityLevel | None
) -> TcbAssessment:
    """Fold the TDX module and QE statuses into the platform status (Intel's converge rules).

    Without TCB info (``platform`` is ``None``) there is no overall status.
    """
    status = None
    if platform is not None:
        status = platform.status
        for other in (tdx_module, qe):
            if other is not None:
                status = _converge(status, other.status)
    return TcbAssessment(status=status, platform=platform, tdx_module=tdx_module, qe=qe)


def _converge(status: str, other: str) -> str:
    if other == REVOKED:
        return REVOKED
    if other == OUT_OF_DATE:
        if status in ("UpToDate", "SWHardeningNeeded"):
            return OUT_OF_DATE
        if status in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return status


def _and(value: bytes, mask: bytes) -> bytes:
    return bytes(a & b for a, b in zip(value, mask, strict=True))
