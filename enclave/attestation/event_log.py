"""The TCG PC Client event log: parse it, replay it per bank, compare it with a TPM's PCRs.

The firmware (and the boot loaders after it) record every measurement they
extend into a PCR; Linux exposes the record as
``/sys/kernel/security/tpm0/binary_bios_measurements``. The format is the
crypto-agile one of the TCG PC Client Platform Firmware Profile (section 10):

1. a first event in the old SHA-1 layout (``TCG_PCClientPCREvent``: PCR index,
   event type ``EV_NO_ACTION``, a 20-byte zero digest, the event size and data)
   whose data is the ``Spec ID Event03`` header naming the digest algorithms
   and their sizes;
2. then ``TCG_PCR_EVENT2`` entries: PCR index, event type, a
   ``TPML_DIGEST_VALUES`` (count, then per algorithm its ID and digest), the
   event size and the event data.

A TDX CC event log (ACPI CCEL) has the same layout, its index naming a
measurement register (1-4 for RTMR0-3) instead of a PCR.

Replaying folds each event's digest into its PCR: ``PCR = H(PCR || digest)``,
from zero, except ``EV_NO_ACTION`` events, which are not extended (the
``StartupLocality`` one sets PCR 0's initial value). Nothing here does I/O:
the caller reads the file within :data:`MAX_EVENT_LOG_BYTES`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from enclave.attestation.event_types import EV_NO_ACTION, describe_event, event_type_name
from enclave.attestation.tpm_structures import HASH_NAMES
from enclave.errors import EventLogError

MAX_EVENT_LOG_BYTES = 4 * 1024 * 1024
MAX_EVENTS = 20_000
MAX_EVENT_DATA_BYTES = 1024 * 1024
MAX_ALGORITHMS = 8
# PCRs 0-23 on a TPM; a CC event log's register indices are smaller still.
MAX_PCR_INDEX = 31
SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
_STARTUP_LOCALITY = b"StartupLocality\0"
_SHA1_DIGEST_SIZE = 20


@dataclass(frozen=True)
class LogEvent:
    """One measurement: where it went, what kind it is, its digests by bank, its data."""

    number: int
    pcr: int
    event_type: int
    digests: Mapping[str, bytes]
    data: bytes

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)

    def describe(self) -> str:
        """A one-line description of what was measured (never raises)."""
        return describe_event(self.event_type, self.data)


@dataclass(frozen=True)
class EventLog:
    """A parsed crypto-agile event log: its banks (algorithm name → digest size) and events."""

    banks: Mapping[str, int]
    events: tuple[LogEvent, ...]
    # Set by a StartupLocality event (H-CRTM or a locality-3 start): PCR 0 starts at that value.
    startup_locality: int = 0

    def replay(self, bank: str) -> dict[int, bytes]:
        """The value each PCR the log extends ends at, in ``bank``."""
        size = self.banks.get(bank)
        if size is None:
            raise EventLogError(f"the event log has no {bank} digests (it has {', '.join(self.banks)})")
        pcrs: dict[int, bytes] = {}
        for event in self.events:
            if event.event_type == EV_NO_ACTION:
                continue
            current = pcrs.get(event.pcr)
            if current is None:
                current = bytes(size - 1) + bytes([self.startup_locality if event.pcr == 0 else 0])
            pcrs[event.pcr] = hashlib.new(bank, current + event.digests[bank]).digest()
        return pcrs

    def measured(self, pcr: int) -> tuple[LogEvent, ...]:
        """The events extended into ``pcr``, in order."""
        return tuple(e for e in self.events if e.pcr == pcr and e.event_type != EV_NO_ACTION)

    def check_against(self, bank: str, actual: Mapping[int, bytes]) -> None:
        """Raise unless every PCR in ``actual`` equals the log's replay of it (unextended: zero)."""
        replayed = self.replay(bank)
        size = self.banks[bank]
        wrong = []
        for pcr, value in sorted(actual.items()):
            expected = replayed.get(pcr, bytes(size))
            if not hmac.compare_digest(expected, value):
                wrong.append(f"PCR {pcr} is {value.hex()}, the log replays to {expected.hex()}")
        if wrong:
            raise EventLogError(f"the event log does not match the TPM's {bank} PCRs: " + "; ".join(wrong))


def parse_event_log(data: bytes) -> EventLog:
    """Parse a crypto-agile TCG event log; trailing padding (all 0x00 or all 0xFF) is ignored."""
    if len(data) > MAX_EVENT_LOG_BYTES:
        raise EventLogError(f"event log is {len(data)} bytes, over the {MAX_EVENT_LOG_BYTES}-byte limit")
    reader = _Reader(data)
    banks = _spec_id_header(reader)
    events: list[LogEvent] = []
    locality = 0
    while not reader.only_padding_left():
        if len(events) >= MAX_EVENTS:
            raise EventLogError(f"event log has more than {MAX_EVENTS} events")
        event = _event2(reader, banks, number=len(events) + 1)
        if event.event_type == EV_NO_ACTION and event.pcr == 0 and event.data.startswith(_STARTUP_LOCALITY):
            if len(event.data) != len(_STARTUP_LOCALITY) + 1 or _extended(events, 0):
                raise EventLogError("StartupLocality event is malformed or comes after PCR 0 was extended")
            locality = event.data[-1]
        events.append(event)
    return EventLog(banks=banks, events=tuple(events), startup_locality=locality)


def _extended(events: list[LogEvent], pcr: int) -> bool:
    return any(e.pcr == pcr and e.event_type != EV_NO_ACTION for e in events)


def _spec_id_header(reader: _Reader) -> dict[str, int]:
    reader.u32("first event PCR index")  # 0 in a TPM log, 1 in a CC event log: either way not extended
    event_type = reader.u32("first event type")
    digest = reader.take(_SHA1_DIGEST_SIZE, "first event digest")
    data = reader.take(reader.u32("first event size"), "first event data")
    if event_type != EV_NO_ACTION or any(digest) or not data.startswith(SPEC_ID_SIGNATURE):
        raise EventLogError(
            "event log does not start with a Spec ID Event03 header: not a crypto-agile TCG log"
        )
    header = _Reader(data[len(SPEC_ID_SIGNATURE) :])
    header.take(4 + 4, "Spec ID platform class and version")  # platformClass, minor, major, errata, uintn
    count = header.u32("Spec ID algorithm count")
    if not 1 <= count <= MAX_ALGORITHMS:
        raise EventLogError(f"Spec ID header names {count} algorithms, expected 1 to {MAX_ALGORITHMS}")
    banks: dict[str, int] = {}
    for _ in range(count):
        algorithm, size = header.u16("Spec ID algorithm"), header.u16("Spec ID digest size")
        name = HASH_NAMES.get(algorithm)
        if name is None:
            raise EventLogError(f"Spec ID header names an unknown digest algorithm {algorithm:#06x}")
        if size != hashlib.new(name).digest_size or name in banks:
            raise EventLogError(f"Spec ID header gives {name} twice or with the wrong size {size}")
        banks[name] = size
    vendor = header.u8("Spec ID vendor info size")
    header.take(vendor, "Spec ID vendor info")
    if header.remaining:
        raise EventLogError(f"Spec ID header has {header.remaining} trailing bytes")
    return banks


def _event2(reader: _Reader, banks: Mapping[str, int], *, number: int) -> LogEvent:
    what = f"event {number}"
    pcr, event_type = reader.u32(f"{what} PCR index"), reader.u32(f"{what} type")
    if pcr > MAX_PCR_INDEX:
        raise EventLogError(f"{what} names PCR {pcr}, beyond {MAX_PCR_INDEX}")
    count = reader.u32(f"{what} digest count")
    if count != len(banks):
        raise EventLogError(f"{what} has {count} digests, the header names {len(banks)} algorithms")
    digests: dict[str, bytes] = {}
    for _ in range(count):
        algorithm = reader.u16(f"{what} digest algorithm")
        name = HASH_NAMES.get(algorithm)
        if name is None or name not in banks or name in digests:
            raise EventLogError(f"{what} has a digest for {algorithm:#06x}, not one of the header's or twice")
        digests[name] = reader.take(banks[name], f"{what} {name} digest")
    size = reader.u32(f"{what} data size")
    if size > MAX_EVENT_DATA_BYTES:
        raise EventLogError(f"{what} data is {size} bytes, over the {MAX_EVENT_DATA_BYTES}-byte limit")
    data = reader.take(size, f"{what} data")
    return LogEvent(number=number, pcr=pcr, event_type=event_type, digests=digests, data=data)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def only_padding_left(self) -> bool:
        rest = self._data[self._offset :]
        return not rest.strip(b"\x00") or not rest.strip(b"\xff")

    def take(self, size: int, what: str) -> bytes:
        if size > self.remaining:
            raise EventLogError(
                f"event log is truncated in {what}: {size} bytes wanted, {self.remaining} left"
            )
        chunk = self._data[self._offset : self._offset + size]
        self._offset += size
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")


def pcr_components(log: EventLog, pcrs: Iterable[int]) -> dict[int, list[str]]:
    """For each of ``pcrs``: one line per event the log extended into it."""
    return {pcr: [f"{e.type_name}: {e.describe()}" for e in log.measured(pcr)] for pcr in pcrs}
