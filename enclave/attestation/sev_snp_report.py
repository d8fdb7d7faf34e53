"""The AMD SEV-SNP attestation report: byte layout and parsing (no cryptography).

Layout per the AMD SEV-SNP Firmware ABI specification, ``ATTESTATION_REPORT``
(table "ATTESTATION_REPORT Structure"), report versions 2 and 3; everything is
little-endian. Version 3 adds the CPUID family/model/stepping bytes at 0x188,
which are reserved (zero) in version 2. Versions 4 and later are refused, not
guessed at.

The four TCB fields are 64-bit ``TCB_VERSION`` values whose byte layout depends
on the product: Milan and Genoa put BOOT_LOADER in byte 0, TEE in 1, SNP in 6
and MICROCODE in 7; Turin puts FMC in 0, BOOT_LOADER in 1, TEE in 2, SNP in 3
and MICROCODE in 7. Nothing in a version 2 report says which product made it,
so the report keeps the raw values and ``TcbVersion.decode`` takes the product,
which the verifier learns from the AMD certificate chain.

Every malformed input raises ``EvidenceError`` naming the offending field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from enclave.errors import EvidenceError

REPORT_SIZE = 0x4A0  # 1184
SIGNED_SIZE = 0x2A0  # the signature covers report[0:0x2A0]
SUPPORTED_VERSIONS = (2, 3)
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
ECDSA_COMPONENT_SIZE = 72  # R and S, little-endian, zero-extended

# (name, offset, size) for every byte of the report, in order. Reserved ranges
# are named "reserved@<offset>" and must be zero.
FIELDS: tuple[tuple[str, int, int], ...] = (
    ("VERSION", 0x000, 4),
    ("GUEST_SVN", 0x004, 4),
    ("POLICY", 0x008, 8),
    ("FAMILY_ID", 0x010, 16),
    ("IMAGE_ID", 0x020, 16),
    ("VMPL", 0x030, 4),
    ("SIGNATURE_ALGO", 0x034, 4),
    ("CURRENT_TCB", 0x038, 8),
    ("PLATFORM_INFO", 0x040, 8),
    ("KEY_INFO", 0x048, 4),
    ("reserved@0x04C", 0x04C, 4),
    ("REPORT_DATA", 0x050, 64),
    ("MEASUREMENT", 0x090, 48),
    ("HOST_DATA", 0x0C0, 32),
    ("ID_KEY_DIGEST", 0x0E0, 48),
    ("AUTHOR_KEY_DIGEST", 0x110, 48),
    ("REPORT_ID", 0x140, 32),
    ("REPORT_ID_MA", 0x160, 32),
    ("REPORTED_TCB", 0x180, 8),
    ("CPUID_FAM_ID", 0x188, 1),
    ("CPUID_MOD_ID", 0x189, 1),
    ("CPUID_STEP", 0x18A, 1),
    ("reserved@0x18B", 0x18B, 21),
    ("CHIP_ID", 0x1A0, 64),
    ("COMMITTED_TCB", 0x1E0, 8),
    ("CURRENT_BUILD", 0x1E8, 1),
    ("CURRENT_MINOR", 0x1E9, 1),
    ("CURRENT_MAJOR", 0x1EA, 1),
    ("reserved@0x1EB", 0x1EB, 1),
    ("COMMITTED_BUILD", 0x1EC, 1),
    ("COMMITTED_MINOR", 0x1ED, 1),
    ("COMMITTED_MAJOR", 0x1EE, 1),
    ("reserved@0x1EF", 0x1EF, 1),
    ("LAUNCH_TCB", 0x1F0, 8),
    ("reserved@0x1F8", 0x1F8, 0xA8),
    ("SIGNATURE", 0x2A0, 0x200),
)
_LAYOUT = {name: (offset, size) for name, offset, size in FIELDS}


class Product(enum.Enum):
    """The AMD EPYC generations whose SEV-SNP reports this module understands."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"


class SigningKey(enum.Enum):
    """KEY_INFO.SIGNING_KEY (bits 4:2): which key signed the report."""

    VCEK = 0
    VLEK = 1
    NONE = 7


@dataclass(frozen=True)
class TcbVersion:
    """One decoded TCB_VERSION. ``fmc`` is ``None`` except on Turin."""

    raw: int
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: int, product: Product) -> TcbVersion:
        b = raw.to_bytes(8, "little")
        if product is Product.TURIN:
            return cls(raw=raw, fmc=b[0], bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7])
        return cls(raw=raw, bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def components(self) -> dict[str, int]:
        """The security patch levels by name (``fmc`` only where the product has it)."""
        parts = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        if self.fmc is not None:
            parts["fmc"] = self.fmc
        return parts

    def to_dict(self) -> dict[str, Any]:
        return {"raw": f"{self.raw:#018x}", **self.components()}


@dataclass(frozen=True)
class GuestPolicy:
    """The guest POLICY the owner launched with (what the guest allows)."""

    raw: int

    def _bit(self, n: int) -> bool:
        return bool(self.raw >> n & 1)

    @property
    def abi_minor(self) -> int:
        return self.raw & 0xFF

    @property
    def abi_major(self) -> int:
        return self.raw >> 8 & 0xFF

    @property
    def smt(self) -> bool:
        return self._bit(16)

    @property
    def migrate_ma(self) -> bool:
        return self._bit(18)

    @property
    def debug(self) -> bool:
        return self._bit(19)

    @property
    def single_socket(self) -> bool:
        return self._bit(20)

    @property
    def cxl_allowed(self) -> bool:
        return self._bit(21)

    @property
    def mem_aes_256_xts(self) -> bool:
        return self._bit(22)

    @property
    def rapl_dis(self) -> bool:
        return self._bit(23)

    @property
    def ciphertext_hiding_dram(self) -> bool:
        return self._bit(24)

    @property
    def page_swap_disable(self) -> bool:
        return self._bit(25)

    def to_dict(self) -> dict[str, Any]:
        return {
            "raw": f"{self.raw:#x}",
            "abi_major": self.abi_major,
            "abi_minor": self.abi_minor,
            "smt": self.smt,
            "migrate_ma": self.migrate_ma,
            "debug": self.debug,
            "single_socket": self.single_socket,
            "cxl_allowed": self.cxl_allowed,
            "mem_aes_256_xts": self.mem_aes_256_xts,
            "rapl_dis": self.rapl_dis,
            "ciphertext_hiding_dram": self.ciphertext_hiding_dram,
            "page_swap_disable": self.page_swap_disable,
        }


# PLATFORM_INFO bits: what the host platform had enabled when the report was made.
_PLATFORM_INFO_BITS = {
    "smt_enabled": 0,
    "tsme_enabled": 1,
    "ecc_enabled": 2,
    "rapl_disabled": 3,
    "ciphertext_hiding_enabled": 4,
    "alias_check_complete": 5,
    "tio_enabled": 7,
}


def platform_info_flags(raw: int) -> dict[str, bool]:
    return {name: bool(raw >> bit & 1) for name, bit in _PLATFORM_INFO_BITS.items()}


@dataclass(frozen=True)
class SnpReport:
    """A parsed report. Its signature and chain are NOT checked here."""

    raw: bytes
    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    key_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: SigningKey
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_fam_id: int  # these three are 0 in version 2 reports (reserved there)
    cpuid_mod_id: int
    cpuid_step: int
    chip_id: bytes
    committed_tcb: int
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: int
    signature_r: int
    signature_s: int

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def chip_id_masked(self) -> bool:
        """An all-zero CHIP_ID: the host set MaskChipId (or the key is a VLEK)."""
        return not any(self.chip_id)

    def to_dict(self, product: Product) -> dict[str, Any]:
        """Every field, JSON-friendly (bytes as hex), TCBs decoded for ``product``."""
        return {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": self.policy.to_dict(),
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "vmpl": self.vmpl,
            "signature_algo": self.signature_algo,
            "current_tcb": TcbVersion.decode(self.current_tcb, product).to_dict(),
            "platform_info": {"raw": f"{self.platform_info:#x}", **platform_info_flags(self.platform_info)},
            "key_info": self.key_info,
            "author_key_en": self.author_key_en,
            "mask_chip_key": self.mask_chip_key,
            "signing_key": self.signing_key.name,
            "report_data": self.report_data.hex(),
            "measurement": self.measurement.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "report_id_ma": self.report_id_ma.hex(),
            "reported_tcb": TcbVersion.decode(self.reported_tcb, product).to_dict(),
            "cpuid_fam_id": self.cpuid_fam_id,
            "cpuid_mod_id": self.cpuid_mod_id,
            "cpuid_step": self.cpuid_step,
            "chip_id": self.chip_id.hex(),
            "chip_id_masked": self.chip_id_masked,
            "committed_tcb": TcbVersion.decode(self.committed_tcb, product).to_dict(),
            "current_version": f"{self.current_major}.{self.current_minor}.{self.current_build}",
            "committed_version": f"{self.committed_major}.{self.committed_minor}.{self.committed_build}",
            "launch_tcb": TcbVersion.decode(self.launch_tcb, product).to_dict(),
        }


def _field_at(offset: int) -> str:
    for name, start, size in FIELDS:
        if start <= offset < start + size:
            return name
    return "end of report"


def parse_report(data: bytes) -> SnpReport:
    """Parse a raw 1184-byte ATTESTATION_REPORT; raise ``EvidenceError`` naming the bad field."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EvidenceError(f"SEV-SNP report must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) < REPORT_SIZE:
        raise EvidenceError(
            f"SEV-SNP report truncated in {_field_at(len(data))}: {len(data)} of {REPORT_SIZE} bytes"
        )
    if len(data) > REPORT_SIZE:
        raise EvidenceError(f"SEV-SNP report is {len(data)} bytes; it must be exactly {REPORT_SIZE}")

    def raw(name: str) -> bytes:
        offset, size = _LAYOUT[name]
        return data[offset : offset + size]

    def num(name: str) -> int:
        return int.from_bytes(raw(name), "little")

    version = num("VERSION")
    if version not in SUPPORTED_VERSIONS:
        raise EvidenceError(f"SEV-SNP report VERSION {version} is not supported (only 2 and 3)")
    if num("SIGNATURE_ALGO") != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        raise EvidenceError(
            f"SEV-SNP report SIGNATURE_ALGO {num('SIGNATURE_ALGO')} is not 1 (ECDSA P-384 with SHA-384)"
        )
    key_info = num("KEY_INFO")
    if key_info >> 5:
        raise EvidenceError(f"SEV-SNP report KEY_INFO {key_info:#x} has reserved bits 31:5 set")
    key_select = key_info >> 2 & 0b111
    try:
        signing_key = SigningKey(key_select)
    except ValueError:
        raise EvidenceError(
            f"SEV-SNP report KEY_INFO.SIGNING_KEY {key_select} is reserved (0 VCEK, 1 VLEK, 7 none)"
        ) from None
    policy = num("POLICY")
    if not policy >> 17 & 1:
        raise EvidenceError(f"SEV-SNP report POLICY {policy:#x} has reserved bit 17 clear (it must be one)")
    reserved = [name for name, _, _ in FIELDS if name.startswith("reserved@")]
    if version == 2:
        reserved += ["CPUID_FAM_ID", "CPUID_MOD_ID", "CPUID_STEP"]
    for name in reserved:
        if any(raw(name)):
            raise EvidenceError(f"SEV-SNP report {name} must be zero in a version {version} report")
    signature = raw("SIGNATURE")
    if any(signature[2 * ECDSA_COMPONENT_SIZE :]):
        raise EvidenceError("SEV-SNP report SIGNATURE has non-zero reserved bytes after R and S")

    return SnpReport(
        raw=data,
        version=version,
        guest_svn=num("GUEST_SVN"),
        policy=GuestPolicy(policy),
        family_id=raw("FAMILY_ID"),
        image_id=raw("IMAGE_ID"),
        vmpl=num("VMPL"),
        signature_algo=num("SIGNATURE_ALGO"),
        current_tcb=num("CURRENT_TCB"),
        platform_info=num("PLATFORM_INFO"),
        key_info=key_info,
        author_key_en=bool(key_info & 1),
        mask_chip_key=bool(key_info >> 1 & 1),
        signing_key=signing_key,
        report_data=raw("REPORT_DATA"),
        measurement=raw("MEASUREMENT"),
        host_data=raw("HOST_DATA"),
        id_key_digest=raw("ID_KEY_DIGEST"),
        author_key_digest=raw("AUTHOR_KEY_DIGEST"),
        report_id=raw("REPORT_ID"),
        report_id_ma=raw("REPORT_ID_MA"),
        reported_tcb=num("REPORTED_TCB"),
        cpuid_fam_id=num("CPUID_FAM_ID"),
        cpuid_mod_id=num("CPUID_MOD_ID"),
        cpuid_step=num("CPUID_STEP"),
        chip_id=raw("CHIP_ID"),
        committed_tcb=num("COMMITTED_TCB"),
        current_build=num("CURRENT_BUILD"),
        current_minor=num("CURRENT_MINOR"),
        current_major=num("CURRENT_MAJOR"),
        committed_build=num("COMMITTED_BUILD"),
        committed_minor=num("COMMITTED_MINOR"),
        committed_major=num("COMMITTED_MAJOR"),
        launch_tcb=num("LAUNCH_TCB"),
        signature_r=int.from_bytes(signature[:ECDSA_COMPONENT_SIZE], "little"),
        signature_s=int.from_bytes(signature[ECDSA_COMPONENT_SIZE : 2 * ECDSA_COMPONENT_SIZE], "little"),
    )
