"""A measured boot for tests: a TCG event log built here, and the same measurements extended into a swtpm.

swtpm has no firmware, so its boot PCRs stay at zero. ``measure_boot`` plays
the firmware and boot loader: it extends each event's digests into the TPM and
returns the crypto-agile event log a kernel would expose for them.
"""

from __future__ import annotations

import hashlib
import importlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from enclave.attestation.event_log import SPEC_ID_SIGNATURE
from enclave.attestation.event_types import EV_NO_ACTION, EV_SEPARATOR
from enclave.attestation.tpm_structures import HASH_IDS

EV_IPL = 0x0000000D
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003


@dataclass(frozen=True)
class BootEvent:
    pcr: int
    event_type: int
    data: bytes


def efi_image(path: str, length: int) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT data whose device path is one file path node."""
    name = path.encode("utf-16-le") + b"\0\0"
    node = bytes([4, 4]) + (4 + len(name)).to_bytes(2, "little") + name
    device_path = node + bytes([0x7F, 0xFF, 4, 0])
    return struct.pack("<QQQQ", 0x1000, length, 0, len(device_path)) + device_path


def classic_boot(kernel: bytes = b"vmlinuz 6.8 genuine") -> list[BootEvent]:
    """Firmware, shim and GRUB measuring a kernel, an initrd and a command line into PCRs 0-9."""
    events = [BootEvent(pcr, EV_SEPARATOR, bytes(4)) for pcr in range(8)]
    events.insert(
        4, BootEvent(4, EV_EFI_BOOT_SERVICES_APPLICATION, efi_image(r"\EFI\BOOT\BOOTX64.EFI", 924688))
    )
    return [
        BootEvent(0, 0x00000008, "Custos test firmware 1.0".encode("utf-16-le")),
        *events,
        BootEvent(8, EV_IPL, b"kernel_cmdline: /vmlinuz ro lockdown=confidentiality\0"),
        BootEvent(9, EV_IPL, kernel),
        BootEvent(9, EV_IPL, b"/initrd.img\0"),
    ]


def event_log(events: Sequence[BootEvent], banks: Sequence[str] = ("sha256", "sha384")) -> bytes:
    """The crypto-agile log of ``events``, each digest being H(data) in every bank."""
    header = SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(banks))
    header += b"".join(struct.pack("<HH", HASH_IDS[b], hashlib.new(b).digest_size) for b in banks) + b"\0"
    log = struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(header)) + header
    for event in events:
        digests = b"".join(
            struct.pack("<H", HASH_IDS[b]) + hashlib.new(b, event.data).digest() for b in banks
        )
        log += struct.pack("<III", event.pcr, event.event_type, len(banks)) + digests
        log += struct.pack("<I", len(event.data)) + event.data
    return log


def measure_boot(
    tcti: str, events: Sequence[BootEvent], banks: Sequence[str] = ("sha256", "sha384")
) -> bytes:
    """Extend ``events`` into the TPM at ``tcti`` as firmware would; return their event log."""
    tss = importlib.import_module("tpm2_pytss")
    with tss.ESAPI(tcti) as esys:
        for event in events:
            values = tss.TPML_DIGEST_VALUES(
                [
                    tss.TPMT_HA(
                        hashAlg=HASH_IDS[b], digest=tss.TPMU_HA(**{b: hashlib.new(b, event.data).digest()})
                    )
                    for b in banks
                ]
            )
            esys.pcr_extend(getattr(tss.ESYS_TR, f"PCR{event.pcr}"), values)
    return event_log(events, banks)
