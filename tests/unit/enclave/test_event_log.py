"""The TCG event log parser: the real TDX CC event log, a log extended into a swtpm, bad logs, fuzzing."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave._daemon.tpm_device import TpmAttester
from enclave.attestation.event_log import MAX_EVENT_LOG_BYTES, parse_event_log, pcr_components
from enclave.errors import EventLogError
from tests import boot_support, tpm_support
from tests.unit.enclave.test_tpm_fuzz import vector

start_swtpm = tpm_support.swtpm_fixture()
open_attester = tpm_support.attester_fixture()
OpenAttester = Callable[..., TpmAttester]
CCEL = "tdx/gotdx_ccel_data.dat"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_real_ccel_log_replays_to_the_quotes_rtmrs() -> None:
    log = parse_event_log(vector(CCEL))
    assert dict(log.banks) == {"sha384": 48}
    assert len([e for e in log.events if e.type_name != "EV_NO_ACTION"]) == 43  # MANIFEST.md
    quote = json.loads(vector("expected_values.json"))["tdx"]["tdx/gotdx_ccel_cos-113-tdx-quote.dat"]["body"]
    replayed = log.replay("sha384")
    # A CC event log's index 1-3 is RTMR0-2 (index 0 would be MRTD, measured by the TDX module).
    assert {i: replayed[i].hex() for i in (1, 2, 3)} == {i + 1: quote[f"rtmr{i}"] for i in range(3)}
    components = pcr_components(log, (1, 2, 3))
    assert (
        "EV_EFI_VARIABLE_DRIVER_CONFIG: variable SecureBoot (8be4df61-93ca-11d2-aa0d-00e098032b8c), 1 bytes"
        in (components[1])
    )
    assert (
        "EV_EFI_BOOT_SERVICES_APPLICATION: image \\EFI\\BOOT\\grub-lakitu.efi, 743168 bytes" in components[2]
    )
    assert any(line.startswith("EV_IPL: kernel_cmdline: /syslinux/vmlinuz.A") for line in components[3])


def test_a_log_extended_into_a_tpm_matches_its_pcrs(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    tpm = start_swtpm()
    log = parse_event_log(boot_support.measure_boot(tpm.tcti, boot_support.classic_boot()))
    attester = open_attester(tpm)
    for bank in ("sha256", "sha384"):
        log.check_against(bank, attester.read_pcrs(range(10), bank=bank))
    assert log.measured(9)[0].describe() == "vmlinuz 6.8 genuine"
    assert log.measured(4)[0].describe() == "image \\EFI\\BOOT\\BOOTX64.EFI, 924688 bytes"


def test_a_log_that_does_not_match_the_tpm_is_refused(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    tpm = start_swtpm()
    boot_support.measure_boot(tpm.tcti, boot_support.classic_boot(kernel=b"another kernel"))
    claimed = parse_event_log(boot_support.event_log(boot_support.classic_boot()))
    with pytest.raises(EventLogError, match="PCR 9 is"):
        claimed.check_against("sha384", open_attester(tpm).read_pcrs(range(10), bank="sha384"))


def test_startup_locality_sets_pcr_0s_initial_value() -> None:
    locality = boot_support.BootEvent(0, 3, b"StartupLocality\0\x03")
    firmware = boot_support.BootEvent(0, 8, b"fw")
    log = parse_event_log(boot_support.event_log([locality, firmware], banks=("sha256",)))
    assert log.startup_locality == 3
    start = bytes(31) + b"\x03"
    assert log.replay("sha256")[0] == hashlib.sha256(start + hashlib.sha256(b"fw").digest()).digest()


GOOD = boot_support.event_log(boot_support.classic_boot())
HEADER_END = 32 + struct.unpack_from("<I", GOOD, 28)[0]


def _replace(offset: int, value: bytes) -> bytes:
    return GOOD[:offset] + value + GOOD[offset + len(value) :]


MALFORMED = [
    ("empty", b"", "truncated"),
    ("sha1-log", struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", 4) + b"abcd", "Spec ID Event03"),
    ("truncated-event", GOOD[:-3], "truncated"),
    ("too-big", b"\0" * (MAX_EVENT_LOG_BYTES + 1), "limit"),
    ("pcr-out-of-range", _replace(HEADER_END, struct.pack("<I", 99)), "PCR 99"),
    ("digest-count", _replace(HEADER_END + 8, struct.pack("<I", 1)), "1 digests"),
    ("unknown-algorithm", _replace(HEADER_END + 12, struct.pack("<H", 0x0099)), "0x0099"),
    ("huge-event-data", GOOD[: -len(b"/initrd.img\0") - 4] + struct.pack("<I", 2**31) + b"x", "limit"),
    ("spec-algorithm-count", _replace(32 + 24, struct.pack("<I", 40)), "40 algorithms"),
    ("spec-wrong-size", _replace(32 + 30, struct.pack("<H", 20)), "wrong size"),
]


@pytest.mark.parametrize(("data", "reason"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_logs_are_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(EventLogError, match=reason):
        parse_event_log(data)


def test_replaying_a_bank_the_log_lacks_is_refused() -> None:
    with pytest.raises(EventLogError, match="no sha1 digests"):
        parse_event_log(GOOD).replay("sha1")


def _only_event_log_errors(data: bytes) -> None:
    try:
        log = parse_event_log(data)
    except EventLogError:
        return
    for event in log.events:
        assert isinstance(event.describe(), str)
    for bank in log.banks:
        log.replay(bank)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_event_log_errors(data: bytes) -> None:
    _only_event_log_errors(data)


@FUZZ
@given(st.data())
def test_truncated_and_mutated_real_logs_raise_only_event_log_errors(data: st.DataObject) -> None:
    sample = data.draw(st.sampled_from([GOOD, vector(CCEL)[:20000]]))
    cut = data.draw(st.integers(0, len(sample)))
    _only_event_log_errors(sample[:cut])
    offset = data.draw(st.integers(0, len(sample) - 1))
    patch = data.draw(st.binary(min_size=1, max_size=8))
    _only_event_log_errors(sample[:offset] + patch + sample[offset + len(patch) :])
