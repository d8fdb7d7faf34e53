"""The SEV-SNP report parser: layout, field decoding, and refusal of malformed input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave.attestation.sev_snp_report import (
    FIELDS,
    REPORT_SIZE,
    GuestPolicy,
    Product,
    SigningKey,
    TcbVersion,
    parse_report,
    platform_info_flags,
)
from enclave.errors import EvidenceError

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"


def _report() -> bytes:
    path = VECTORS / "sev-snp" / "trustee_test-report.bin"
    if not path.is_file():
        pytest.fail(f"SEV-SNP test vector {path} is missing: check out ../shared/vectors next to the repo")
    return path.read_bytes()


def _put(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_layout_covers_every_byte_once() -> None:
    offset = 0
    for name, start, size in FIELDS:
        assert start == offset, name
        offset += size
    assert offset == REPORT_SIZE == 1184


def test_real_report_fields() -> None:
    r = parse_report(_report())
    assert (r.version, r.guest_svn, r.vmpl, r.signature_algo) == (2, 4, 0, 1)
    assert (r.signing_key, r.author_key_en, r.mask_chip_key) == (SigningKey.VCEK, False, False)
    assert r.measurement.hex().startswith("a1f3930413247bb3")
    assert (r.current_major, r.current_minor, r.current_build) == (1, 52, 4)
    assert r.signed_bytes == _report()[:0x2A0]
    assert r.signature_r > 0
    assert r.signature_s > 0
    assert not r.chip_id_masked


def test_tcb_layouts() -> None:
    milan = TcbVersion.decode(0x7308000000000003, Product.MILAN)
    assert milan.components() == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    assert TcbVersion.decode(0x7308000000000003, Product.GENOA) == milan
    turin = TcbVersion.decode(int.from_bytes(bytes([1, 2, 3, 4, 0, 0, 0, 9]), "little"), Product.TURIN)
    assert turin.components() == {"bootloader": 2, "tee": 3, "snp": 4, "microcode": 9, "fmc": 1}
    assert turin.to_dict()["raw"] == "0x0900000004030201"


def test_policy_and_platform_info_bits() -> None:
    policy = GuestPolicy(0x3001F)
    assert (policy.abi_major, policy.abi_minor, policy.smt, policy.debug, policy.migrate_ma) == (
        0,
        31,
        True,
        False,
        False,
    )
    assert GuestPolicy(0xB0000).debug  # the go-sev-guest sample allows debugging
    names = [
        "smt",
        "migrate_ma",
        "debug",
        "single_socket",
        "cxl_allowed",
        "mem_aes_256_xts",
        "rapl_dis",
        "ciphertext_hiding_dram",
        "page_swap_disable",
    ]
    for bit, name in zip([16, *range(18, 26)], names, strict=True):
        flags = GuestPolicy(1 << 17 | 1 << bit).to_dict()
        assert [k for k, v in flags.items() if v is True] == [name]
    assert platform_info_flags(0x21) == {
        "smt_enabled": True,
        "tsme_enabled": False,
        "ecc_enabled": False,
        "rapl_disabled": False,
        "ciphertext_hiding_enabled": False,
        "alias_check_complete": True,
        "tio_enabled": False,
    }


def test_version_3_reads_the_cpuid_bytes() -> None:
    data = _put(_put(_report(), 0, (3).to_bytes(4, "little")), 0x188, bytes([0x19, 0x11, 0x01]))
    r = parse_report(data)
    assert (r.version, r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step) == (3, 0x19, 0x11, 0x01)


INVALID: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("empty", lambda r: b"", "truncated in VERSION"),
    ("in-report-data", lambda r: r[:100], "truncated in REPORT_DATA: 100 of 1184"),
    ("one-short", lambda r: r[:-1], "truncated in SIGNATURE"),
    ("one-long", lambda r: r + b"\0", "must be exactly 1184"),
    ("version-1", lambda r: _put(r, 0, (1).to_bytes(4, "little")), "VERSION 1 is not supported"),
    ("version-5", lambda r: _put(r, 0, (5).to_bytes(4, "little")), "VERSION 5 is not supported"),
    ("sig-algo", lambda r: _put(r, 0x34, (2).to_bytes(4, "little")), "SIGNATURE_ALGO 2"),
    ("signing-key-2", lambda r: _put(r, 0x48, (2 << 2).to_bytes(4, "little")), "SIGNING_KEY 2 is reserved"),
    ("key-info-reserved", lambda r: _put(r, 0x48, (1 << 5).to_bytes(4, "little")), "KEY_INFO 0x20"),
    ("policy-bit-17", lambda r: _put(r, 0x08, (0x1001F).to_bytes(8, "little")), "reserved bit 17"),
    ("reserved-0x4c", lambda r: _put(r, 0x4C, b"\1"), "reserved@0x04C must be zero"),
    ("reserved-0x1f8", lambda r: _put(r, 0x200, b"\1"), "reserved@0x1F8 must be zero"),
    ("reserved-0x1eb", lambda r: _put(r, 0x1EB, b"\1"), "reserved@0x1EB must be zero"),
    ("v2-cpuid", lambda r: _put(r, 0x188, b"\x19"), "CPUID_FAM_ID must be zero in a version 2 report"),
    ("v3-reserved", lambda r: _put(_put(r, 0, b"\3"), 0x18B, b"\1"), "reserved@0x18B must be zero"),
    ("sig-reserved", lambda r: _put(r, 0x4A0 - 1, b"\1"), "SIGNATURE has non-zero reserved bytes"),
]


@pytest.mark.parametrize(("mutate", "needle"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_malformed_reports_name_the_field(mutate: Callable[[bytes], bytes], needle: str) -> None:
    with pytest.raises(EvidenceError, match=needle):
        parse_report(mutate(_report()))


def test_non_bytes_input_is_an_evidence_error() -> None:
    with pytest.raises(EvidenceError, match="must be bytes"):
        parse_report("a" * 1184)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(length=st.integers(0, REPORT_SIZE - 1))
def test_every_truncation_is_refused_naming_a_field(length: int) -> None:
    with pytest.raises(EvidenceError, match=f"truncated in .*: {length} of 1184 bytes"):
        parse_report(_report()[:length])


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=REPORT_SIZE + 64))
def test_random_bytes_raise_only_evidence_error(data: bytes) -> None:
    try:
        parse_report(data)
    except EvidenceError:
        pass


@settings(max_examples=150, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, REPORT_SIZE - 1), st.integers(0, 255)), min_size=1, max_size=8)
)
def test_random_edits_of_a_real_report_parse_or_raise_evidence_error(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_report())
    for offset, value in edits:
        data[offset] = value
    try:
        parse_report(bytes(data))
    except EvidenceError:
        pass
