"""Intel PCS TCB info (v2, v3) and enclave identity (v2) documents, parsed from verified JSON.

:mod:`enclave.attestation.dcap_collateral` checks a document's signature
over its exact text before it reaches these parsers; every missing or
mistyped field raises ``EvidenceError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from enclave.errors import EvidenceError

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


@dataclass(frozen=True)
class IdentityLevel:
    """A TCB level of the QE identity or of a TDX module identity (by ISV SVN)."""

    isvsvn: int
    tcb_date: str
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class TdxModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[IdentityLevel, ...]


@dataclass(frozen=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pcesvn: int
    tdx_components: tuple[int, ...] | None
    tcb_date: str
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class TcbInfo:
    id: str  # "SGX" or "TDX"
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pceid: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    levels: tuple[TcbLevel, ...]


@dataclass(frozen=True)
class EnclaveIdentity:
    id: str  # "QE", "TD_QE" or "QVE"
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    levels: tuple[IdentityLevel, ...]


def parse_tcb_info(doc: dict[str, Any]) -> TcbInfo:
    what = "tcb_info"
    version = _int(doc, "version", what)
    if version not in (2, 3):
        raise EvidenceError(f"tcb_info version {version} is not supported (2 or 3)")
    tcb_id = _str(doc, "id", what) if version == 3 else "SGX"
    if tcb_id not in ("SGX", "TDX"):
        raise EvidenceError(f"tcb_info id {tcb_id!r} is neither SGX nor TDX")
    tdx_module = None
    identities: tuple[TdxModuleIdentity, ...] = ()
    if tcb_id == "TDX":
        tdx_module = _module_identity(_obj(doc, "tdxModule", what), "tcb_info tdxModule", with_levels=False)
        raw_ids = doc.get("tdxModuleIdentities", [])
        if not isinstance(raw_ids, list):
            raise EvidenceError("tcb_info tdxModuleIdentities is not a list")
        identities = tuple(_module_identity(_as_obj(m, what), "tcb_info tdxModuleIdentity") for m in raw_ids)
    return TcbInfo(
        id=tcb_id,
        version=version,
        issue_date=_date(doc, "issueDate", what),
        next_update=_date(doc, "nextUpdate", what),
        fmspc=_hex(_str(doc, "fmspc", what), "tcb_info fmspc", 6),
        pceid=_hex(_str(doc, "pceId", what), "tcb_info pceId", 2),
        tcb_type=_int(doc, "tcbType", what),
        tcb_evaluation_data_number=_int(doc, "tcbEvaluationDataNumber", what),
        tdx_module=tdx_module,
        tdx_module_identities=identities,
        levels=tuple(_tcb_level(_as_obj(lv, what), version, tcb_id) for lv in _list(doc, "tcbLevels", what)),
    )


def parse_enclave_identity(doc: dict[str, Any]) -> EnclaveIdentity:
    what = "qe_identity"
    version = _int(doc, "version", what)
    if version != 2:
        raise EvidenceError(f"qe_identity version {version} is not supported (2)")
    return EnclaveIdentity(
        id=_str(doc, "id", what),
        version=version,
        issue_date=_date(doc, "issueDate", what),
        next_update=_date(doc, "nextUpdate", what),
        tcb_evaluation_data_number=_int(doc, "tcbEvaluationDataNumber", what),
        miscselect=int.from_bytes(_hex(_str(doc, "miscselect", what), "qe_identity miscselect", 4), "big"),
        miscselect_mask=int.from_bytes(
            _hex(_str(doc, "miscselectMask", what), "qe_identity miscselectMask", 4), "big"
        ),
        attributes=_hex(_str(doc, "attributes", what), "qe_identity attributes", 16),
        attributes_mask=_hex(_str(doc, "attributesMask", what), "qe_identity attributesMask", 16),
        mrsigner=_hex(_str(doc, "mrsigner", what), "qe_identity mrsigner", 32),
        isvprodid=_int(doc, "isvprodid", what),
        levels=tuple(_identity_level(_as_obj(lv, what), what) for lv in _list(doc, "tcbLevels", what)),
    )


def _module_identity(doc: dict[str, Any], what: str, *, with_levels: bool = True) -> TdxModuleIdentity:
    return TdxModuleIdentity(
        id=_str(doc, "id", what) if with_levels else "",
        mrsigner=_hex(_str(doc, "mrsigner", what), f"{what} mrsigner", 48),
        attributes=_hex(_str(doc, "attributes", what), f"{what} attributes", 8),
        attributes_mask=_hex(_str(doc, "attributesMask", what), f"{what} attributesMask", 8),
        levels=tuple(_identity_level(_as_obj(lv, what), what) for lv in _list(doc, "tcbLevels", what))
        if with_levels
        else (),
    )


def _tcb_level(doc: dict[str, Any], version: int, tcb_id: str) -> TcbLevel:
    what = "tcb_info tcbLevel"
    tcb = _obj(doc, "tcb", what)
    tdx: tuple[int, ...] | None = None
    if version == 2:
        sgx = tuple(_int(tcb, f"sgxtcbcomp{i:02d}svn", what) for i in range(1, 17))
    else:
        sgx = _components(tcb, "sgxtcbcomponents", what)
        if tcb_id == "TDX":
            tdx = _components(tcb, "tdxtcbcomponents", what)
    return TcbLevel(
        sgx_components=sgx,
        pcesvn=_int(tcb, "pcesvn", what),
        tdx_components=tdx,
        tcb_date=_str(doc, "tcbDate", what),
        status=_status(doc, what),
        advisory_ids=_advisories(doc, what),
    )


def _identity_level(doc: dict[str, Any], what: str) -> IdentityLevel:
    return IdentityLevel(
        isvsvn=_int(_obj(doc, "tcb", what), "isvsvn", what),
        tcb_date=_str(doc, "tcbDate", what),
        status=_status(doc, what),
        advisory_ids=_advisories(doc, what),
    )


def _components(doc: dict[str, Any], key: str, what: str) -> tuple[int, ...]:
    items = _list(doc, key, what)
    if len(items) != 16:
        raise EvidenceError(f"{what} {key} has {len(items)} entries, expected 16")
    return tuple(_int(_as_obj(item, what), "svn", f"{what} {key}") for item in items)


def _status(doc: dict[str, Any], what: str) -> str:
    status = _str(doc, "tcbStatus", what)
    if status not in TCB_STATUSES:
        raise EvidenceError(f"{what} has unknown tcbStatus {status!r}")
    return status


def _advisories(doc: dict[str, Any], what: str) -> tuple[str, ...]:
    ids = doc.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise EvidenceError(f"{what} advisoryIDs is not a list of strings")
    return tuple(ids)


def _as_obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EvidenceError(f"{what} holds a non-object where an object is expected")
    return value


def _obj(doc: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    if key not in doc:
        raise EvidenceError(f"{what} lacks {key!r}")
    return _as_obj(doc[key], f"{what} {key}")


def _list(doc: dict[str, Any], key: str, what: str) -> list[Any]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise EvidenceError(f"{what} {key!r} is missing or not a list")
    return value


def _str(doc: dict[str, Any], key: str, what: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise EvidenceError(f"{what} {key!r} is missing or not a string")
    return value


def _int(doc: dict[str, Any], key: str, what: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
        raise EvidenceError(f"{what} {key!r} is missing or not a non-negative integer")
    return value


def _hex(value: str, what: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise EvidenceError(f"{what} is not hex") from None
    if len(raw) != size:
        raise EvidenceError(f"{what} is {len(raw)} bytes, expected {size}")
    return raw


def _date(doc: dict[str, Any], key: str, what: str) -> datetime:
    text = _str(doc, key, what)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise EvidenceError(f"{what} {key!r} is not an ISO 8601 date: {text!r}") from None
    if value.tzinfo is None:
        raise EvidenceError(f"{what} {key!r} has no time zone: {text!r}")
    return value
