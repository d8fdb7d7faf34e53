"""TCG event types and what their data says, for people reading an event log.

Names and data layouts: TCG PC Client Platform Firmware Profile, section 10.4
(``EV_*``), and the UEFI structures it names (``UEFI_VARIABLE_DATA``,
``UEFI_IMAGE_LOAD_EVENT`` with its device path, ``UEFI_PLATFORM_FIRMWARE_BLOB``).
A description is for display only: the replay never depends on it, and it never
raises, whatever the data holds.
"""

from __future__ import annotations

import struct
import uuid

EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004

EVENT_TYPES: dict[int, str] = {
    0x00000000: "EV_PREBOOT_CERT",
    0x00000001: "EV_POST_CODE",
    0x00000002: "EV_UNUSED",
    EV_NO_ACTION: "EV_NO_ACTION",
    EV_SEPARATOR: "EV_SEPARATOR",
    0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH",
    0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE",
    0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x8000000D: "EV_EFI_GPT_EVENT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}
_VARIABLE_EVENTS = (0x80000001, 0x80000002, 0x8000000C, 0x800000E0)
_IMAGE_EVENTS = (0x80000003, 0x80000004, 0x80000005)
_TEXT_EVENTS = (0x00000001, 0x00000005, 0x0000000D, 0x80000007, 0x00000008)
_MAX_TEXT = 120
_MEDIA_DEVICE_PATH, _FILE_PATH_NODE, _END_OF_PATH = 0x04, 0x04, 0x7F


def event_type_name(event_type: int) -> str:
    return EVENT_TYPES.get(event_type, f"EV_UNKNOWN({event_type:#010x})")


def describe_event(event_type: int, data: bytes) -> str:
    """What the event measured, in one short line."""
    try:
        if event_type in _VARIABLE_EVENTS:
            return _variable(data)
        if event_type in _IMAGE_EVENTS:
            return _image(data)
        if event_type == EV_SEPARATOR:
            return "separator" if data in (bytes(4), b"") else f"separator {data[:4].hex()} (an error)"
        if event_type == EV_NO_ACTION:
            signature = data.split(b"\0", 1)[0]
            return f"not extended: {_text(signature)}"
        if event_type in _TEXT_EVENTS:
            return _text(data)
        if event_type == 0x8000000A and data:  # EV_EFI_PLATFORM_FIRMWARE_BLOB2: a described blob
            return f"firmware blob {_text(data[1 : 1 + data[0]])}"
    except (ValueError, struct.error, IndexError):
        pass
    return f"{len(data)} bytes"


def _variable(data: bytes) -> str:
    """UEFI_VARIABLE_DATA: GUID, name length (UTF-16 units), data length, name, data."""
    guid = uuid.UUID(bytes_le=data[:16])
    name_length, data_length = struct.unpack_from("<QQ", data, 16)
    name = data[32 : 32 + 2 * name_length].decode("utf-16-le")
    if len(name) != name_length:
        raise ValueError("short variable name")
    return f"variable {_printable(name) or '(unnamed)'} ({guid}), {data_length} bytes"


def _image(data: bytes) -> str:
    """UEFI_IMAGE_LOAD_EVENT: address, length, link address, device path length, device path."""
    _, length, _, path_length = struct.unpack_from("<QQQQ", data)
    path = _file_path(data[32 : 32 + path_length])
    return f"image {path or '(no file path)'}, {length} bytes"


def _file_path(path: bytes) -> str:
    """The file path nodes of a UEFI device path, joined."""
    parts: list[str] = []
    offset = 0
    while offset + 4 <= len(path):
        node_type, subtype = path[offset], path[offset + 1]
        size = int.from_bytes(path[offset + 2 : offset + 4], "little")
        if node_type == _END_OF_PATH or size < 4:
            break
        if (node_type, subtype) == (_MEDIA_DEVICE_PATH, _FILE_PATH_NODE):
            parts.append(path[offset + 4 : offset + size].decode("utf-16-le").rstrip("\0"))
        offset += size
    return _printable("".join(parts))


def _text(data: bytes) -> str:
    """Printable text of UTF-8 or (ASCII in) UTF-16LE data, cut short; hex when it is neither."""
    utf16 = len(data) >= 2 and len(data) % 2 == 0 and not any(data[1::2])
    text = _printable(data.decode("utf-16-le" if utf16 else "utf-8", errors="replace"))
    return text or f"{len(data)} bytes: {data[:16].hex()}{'…' if len(data) > 16 else ''}"


def _printable(text: str) -> str:
    """``text`` on one line and cut short; empty when it holds anything unprintable."""
    text = " ".join(text.rstrip("\0").split())
    if not all(c.isprintable() for c in text):
        return ""
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "…"
