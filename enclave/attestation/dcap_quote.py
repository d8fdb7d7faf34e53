"""The Intel DCAP quote format: SGX quotes v3, TDX quotes v4 and v5, parsed from bytes.

Parsing only; :mod:`enclave.attestation.dcap` checks the signatures. Layout
(all integers little-endian), after Intel's "SGX ECDSA Quote Library" and
"TDX DCAP Quoting Library" specifications:

* header, 48 bytes: version u16, attestation key type u16 (2 = ECDSA-P256),
  TEE type u32 (0 = SGX, 0x81 = TDX), QE SVN u16, PCE SVN u16, QE vendor ID
  16 bytes, user data 20 bytes;
* body: v3 an SGX enclave report (384 bytes), v4 a TD report (584 bytes; an
  SGX report when the TEE type is SGX), v5 a
  descriptor (type u16: 1 SGX, 2 TDX 1.0, 3 TDX 1.5; size u32) then the body
  (TDX 1.5 adds TEE_TCB_SVN2 and MRSERVICETD: 648 bytes);
* signature data: length u32, then the quote signature (r||s, 64 bytes), the
  attestation key (X||Y, 64 bytes), and the QE certification data: the QE
  report (384 bytes), its signature, the QE authentication data (u16 length)
  and certification data type 5 (the PCK certificate chain, PEM). v4 and v5
  wrap the QE part in certification data type 6.

Every input is bounded before it is read and every failure raises
``EvidenceError`` naming the field. Bytes after the signature data (buffers,
padding) are ignored and counted in ``Quote.trailing_bytes``.
"""

from __future__ import annotations

import binascii
import dataclasses
import struct
from dataclasses import dataclass

from enclave.errors import EvidenceError

MAX_QUOTE_BYTES = 64 * 1024
HEADER_SIZE = 48
ENCLAVE_REPORT_SIZE = 384
TD10_REPORT_SIZE = 584
TD15_REPORT_SIZE = 648
SIGNATURE_SIZE = 64
ATTESTATION_KEY_SIZE = 64

TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
ATTESTATION_KEY_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

BODY_SGX = 1
BODY_TD10 = 2
BODY_TD15 = 3
_BODY_SIZES = {BODY_SGX: ENCLAVE_REPORT_SIZE, BODY_TD10: TD10_REPORT_SIZE, BODY_TD15: TD15_REPORT_SIZE}
_BODY_NAMES = {BODY_SGX: "SGX", BODY_TD10: "TDX1.0", BODY_TD15: "TDX1.5"}

CERT_DATA_PCK_CHAIN = 5
CERT_DATA_QE_REPORT = 6


class _Reader:
    """Reads fields from a byte string; every overrun is an ``EvidenceError`` naming the field."""

    def __init__(self, data: bytes, offset: int = 0, end: int | None = None) -> None:
        self._data = data
        self.offset = offset
        self.end = len(data) if end is None else end

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or self.offset + size > self.end:
            raise EvidenceError(
                f"quote is truncated in {field}: needs {size} bytes at offset {self.offset}, "
                f"{max(self.end - self.offset, 0)} left"
            )
        chunk = self._data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u16(self, field: str) -> int:
        value: int = struct.unpack("<H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack("<I", self.take(4, field))[0]
        return value


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    @classmethod
    def parse(cls, reader: _Reader) -> QuoteHeader:
        return cls(
            version=reader.u16("header.version"),
            att_key_type=reader.u16("header.att_key_type"),
            tee_type=reader.u32("header.tee_type"),
            qe_svn=reader.u16("header.qe_svn"),
            pce_svn=reader.u16("header.pce_svn"),
            qe_vendor_id=reader.take(16, "header.qe_vendor_id"),
            user_data=reader.take(20, "header.user_data"),
        )


@dataclass(frozen=True)
class EnclaveReport:
    """An SGX REPORT body (384 bytes): the SGX quote body and the QE report."""

    cpusvn: bytes
    miscselect: bytes  # 4 bytes as in the report (little-endian u32)
    isv_ext_prod_id: bytes
    attributes: bytes
    mrenclave: bytes
    mrsigner: bytes
    config_id: bytes
    isvprodid: int
    isvsvn: int
    config_svn: int
    isv_family_id: bytes
    reportdata: bytes

    @classmethod
    def parse(cls, raw: bytes, what: str) -> EnclaveReport:
        if len(raw) != ENCLAVE_REPORT_SIZE:
            raise EvidenceError(f"{what} is {len(raw)} bytes, expected {ENCLAVE_REPORT_SIZE}")
        r = _Reader(raw)
        cpusvn = r.take(16, f"{what}.cpusvn")
        miscselect = r.take(4, f"{what}.miscselect")
        r.take(12, f"{what}.reserved1")
        isv_ext_prod_id = r.take(16, f"{what}.isv_ext_prod_id")
        attributes = r.take(16, f"{what}.attributes")
        mrenclave = r.take(32, f"{what}.mrenclave")
        r.take(32, f"{what}.reserved2")
        mrsigner = r.take(32, f"{what}.mrsigner")
        r.take(32, f"{what}.reserved3")
        config_id = r.take(64, f"{what}.config_id")
        isvprodid = r.u16(f"{what}.isvprodid")
        isvsvn = r.u16(f"{what}.isvsvn")
        config_svn = r.u16(f"{what}.config_svn")
        r.take(42, f"{what}.reserved4")
        isv_family_id = r.take(16, f"{what}.isv_family_id")
        reportdata = r.take(64, f"{what}.reportdata")
        return cls(
            cpusvn=cpusvn,
            miscselect=miscselect,
            isv_ext_prod_id=isv_ext_prod_id,
            attributes=attributes,
            mrenclave=mrenclave,
            mrsigner=mrsigner,
            config_id=config_id,
            isvprodid=isvprodid,
            isvsvn=isvsvn,
            config_svn=config_svn,
            isv_family_id=isv_family_id,
            reportdata=reportdata,
        )

    def registers(self) -> dict[str, bytes]:
        """Measurement and identity fields by name, as raw report bytes (integers little-endian)."""
        return {
            "mrenclave": self.mrenclave,
            "mrsigner": self.mrsigner,
            "attributes": self.attributes,
            "miscselect": self.miscselect,
            "isvprodid": self.isvprodid.to_bytes(2, "little"),
            "isvsvn": self.isvsvn.to_bytes(2, "little"),
            "config_id": self.config_id,
            "config_svn": self.config_svn.to_bytes(2, "little"),
            "isv_ext_prod_id": self.isv_ext_prod_id,
            "isv_family_id": self.isv_family_id,
            "cpusvn": self.cpusvn,
        }

    @property
    def miscselect_value(self) -> int:
        return int.from_bytes(self.miscselect, "little")

    @property
    def debug(self) -> bool:
        """ATTRIBUTES.DEBUG (bit 1 of the flags): the enclave's memory is readable by the host."""
        return bool(self.attributes[0] & 0x02)


@dataclass(frozen=True)
class TdReport:
    """A TD quote body: TDX 1.0 (584 bytes) or TDX 1.5 (648 bytes, with the last two fields)."""

    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    reportdata: bytes
    tee_tcb_svn2: bytes | None = None
    mrservicetd: bytes | None = None

    @classmethod
    def parse(cls, raw: bytes) -> TdReport:
        if len(raw) not in (TD10_REPORT_SIZE, TD15_REPORT_SIZE):
            raise EvidenceError(f"TD report body is {len(raw)} bytes, expected 584 or 648")
        r = _Reader(raw)
        fields: dict[str, bytes] = {}
        for name, size in (
            ("tee_tcb_svn", 16),
            ("mrseam", 48),
            ("mrsignerseam", 48),
            ("seam_attributes", 8),
            ("td_attributes", 8),
            ("xfam", 8),
            ("mrtd", 48),
            ("mrconfigid", 48),
            ("mrowner", 48),
            ("mrownerconfig", 48),
            ("rtmr0", 48),
            ("rtmr1", 48),
            ("rtmr2", 48),
            ("rtmr3", 48),
            ("reportdata", 64),
        ):
            fields[name] = r.take(size, f"td_report.{name}")
        if len(raw) == TD15_REPORT_SIZE:
            fields["tee_tcb_svn2"] = r.take(16, "td_report.tee_tcb_svn2")
            fields["mrservicetd"] = r.take(48, "td_report.mrservicetd")
        return cls(**fields)

    def registers(self) -> dict[str, bytes]:
        """Every field but REPORTDATA by name (MRTD, RTMR0-3, MRSEAM, TD_ATTRIBUTES, ...), raw bytes."""
        return {
            f.name: value
            for f in dataclasses.fields(self)
            if f.name != "reportdata" and isinstance(value := getattr(self, f.name), bytes)
        }

    @property
    def debug(self) -> bool:
        """TD_ATTRIBUTES.DEBUG (bit 0): the host can read and modify the TD's state."""
        return bool(self.td_attributes[0] & 0x01)


@dataclass(frozen=True)
class Quote:
    header: QuoteHeader
    body_type: int  # BODY_SGX, BODY_TD10 or BODY_TD15
    body: EnclaveReport | TdReport
    # What the attestation key signed: header, (v5) body descriptor, body.
    signed_bytes: bytes
    signature: bytes
    attestation_key: bytes
    qe_report_bytes: bytes
    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes
    size: int
    trailing_bytes: int

    @property
    def is_tdx(self) -> bool:
        return self.header.tee_type == TEE_TYPE_TDX

    @property
    def report_data(self) -> bytes:
        return self.body.reportdata

    @property
    def format_name(self) -> str:
        return f"Intel DCAP quote v{self.header.version} ({_BODY_NAMES[self.body_type]})"


def decode_quote_text(data: bytes) -> bytes:
    """A quote from a file: raw bytes as they are, or ASCII hex (optionally ``0x``-prefixed).

    Raw quotes start with the little-endian version (``03 00``, ``04 00`` or
    ``05 00``), which is never ASCII hex, so the two cannot be confused.
    """
    if len(data) > 2 * MAX_QUOTE_BYTES + 16:
        raise EvidenceError(f"quote file is {len(data)} bytes, over the limit")
    if data[:2] in (b"\x03\x00", b"\x04\x00", b"\x05\x00"):
        return data
    text = b"".join(data.split())
    if text[:2] in (b"0x", b"0X"):
        text = text[2:]
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        raise EvidenceError("quote is neither a binary DCAP quote nor hex text") from None


def parse_quote(data: bytes) -> Quote:
    """Parse a DCAP quote (v3, v4 or v5); bytes after its signature data are ignored."""
    if len(data) > MAX_QUOTE_BYTES:
        raise EvidenceError(f"quote is {len(data)} bytes, over the {MAX_QUOTE_BYTES}-byte limit")
    reader = _Reader(bytes(data))
    header = QuoteHeader.parse(reader)
    _check_header(header)
    body_type, body = _parse_body(reader, header)
    signed_end = reader.offset
    sig_len = reader.u32("signature_data_len")
    if sig_len > reader.end - reader.offset:
        raise EvidenceError(
            f"quote is truncated in signature_data: length field says {sig_len} bytes, "
            f"{reader.end - reader.offset} left"
        )
    end = reader.offset + sig_len
    sig = _Reader(reader._data, reader.offset, end)
    signature = sig.take(SIGNATURE_SIZE, "quote_signature")
    attestation_key = sig.take(ATTESTATION_KEY_SIZE, "attestation_key")
    if header.version == 3:
        qe = _parse_qe_certification(sig, "certification_data")
    else:
        cert_type = sig.u16("certification_data.type")
        if cert_type != CERT_DATA_QE_REPORT:
            raise EvidenceError(
                f"certification_data.type is {cert_type}, expected {CERT_DATA_QE_REPORT} (QE report)"
            )
        size = sig.u32("certification_data.size")
        inner = _Reader(reader._data, sig.offset, sig.offset + size)
        if inner.end > end:
            raise EvidenceError("certification_data.size runs past the signature data")
        qe = _parse_qe_certification(inner, "qe_report_certification_data")
        _expect_consumed(inner, "certification_data")
        sig.offset = inner.end
    _expect_consumed(sig, "signature_data")
    qe_report_bytes, qe_report_signature, qe_auth_data, pck_chain_pem = qe
    return Quote(
        header=header,
        body_type=body_type,
        body=body,
        signed_bytes=bytes(data[:signed_end]),
        signature=signature,
        attestation_key=attestation_key,
        qe_report_bytes=qe_report_bytes,
        qe_report=EnclaveReport.parse(qe_report_bytes, "qe_report"),
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_chain_pem=pck_chain_pem,
        size=end,
        trailing_bytes=len(data) - end,
    )


def _check_header(header: QuoteHeader) -> None:
    if header.version not in (3, 4, 5):
        raise EvidenceError(
            f"header.version is {header.version}; only DCAP quotes v3, v4 and v5 are supported"
        )
    if header.att_key_type != ATTESTATION_KEY_ECDSA_P256:
        raise EvidenceError(f"header.att_key_type is {header.att_key_type}, expected 2 (ECDSA-P256)")
    if header.tee_type not in (TEE_TYPE_SGX, TEE_TYPE_TDX):
        raise EvidenceError(f"header.tee_type is {header.tee_type:#x}, expected 0 (SGX) or 0x81 (TDX)")
    if header.version == 3 and header.tee_type != TEE_TYPE_SGX:
        raise EvidenceError("header.tee_type: a v3 quote must be an SGX quote")
    if header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise EvidenceError(f"header.qe_vendor_id is {header.qe_vendor_id.hex()}, not Intel's QE")


def _parse_body(reader: _Reader, header: QuoteHeader) -> tuple[int, EnclaveReport | TdReport]:
    if header.version in (3, 4):
        body_type = BODY_TD10 if header.tee_type == TEE_TYPE_TDX else BODY_SGX
    else:
        body_type = reader.u16("body_descriptor.type")
        size = reader.u32("body_descriptor.size")
        if body_type not in _BODY_SIZES:
            raise EvidenceError(f"body_descriptor.type is {body_type}, expected 1, 2 or 3")
        if size != _BODY_SIZES[body_type]:
            raise EvidenceError(
                f"body_descriptor.size is {size}, expected {_BODY_SIZES[body_type]} for body type {body_type}"
            )
        if (body_type == BODY_SGX) != (header.tee_type == TEE_TYPE_SGX):
            raise EvidenceError(f"body_descriptor.type {body_type} does not match the header's TEE type")
    raw = reader.take(_BODY_SIZES[body_type], "body")
    if body_type == BODY_SGX:
        return body_type, EnclaveReport.parse(raw, "body")
    return body_type, TdReport.parse(raw)


def _parse_qe_certification(reader: _Reader, what: str) -> tuple[bytes, bytes, bytes, bytes]:
    qe_report = reader.take(ENCLAVE_REPORT_SIZE, f"{what}.qe_report")
    qe_report_signature = reader.take(SIGNATURE_SIZE, f"{what}.qe_report_signature")
    auth_len = reader.u16(f"{what}.qe_auth_data.size")
    qe_auth_data = reader.take(auth_len, f"{what}.qe_auth_data")
    cert_type = reader.u16(f"{what}.pck_certification_data.type")
    if cert_type != CERT_DATA_PCK_CHAIN:
        raise EvidenceError(
            f"{what}.pck_certification_data.type is {cert_type}; only type 5 (PCK certificate chain) "
            "is supported"
        )
    size = reader.u32(f"{what}.pck_certification_data.size")
    pck_chain = reader.take(size, f"{what}.pck_certification_data")
    return qe_report, qe_report_signature, qe_auth_data, pck_chain


def _expect_consumed(reader: _Reader, what: str) -> None:
    if reader.offset != reader.end:
        raise EvidenceError(f"{what} has {reader.end - reader.offset} unexplained bytes at its end")
