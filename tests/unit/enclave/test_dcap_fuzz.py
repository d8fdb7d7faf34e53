"""Property tests: the DCAP parsers raise ``EvidenceError`` and nothing else, and never hang.

Inputs: truncations of real quotes, real quotes with random bytes written over
them (length fields included), random bytes, random text for the hex decoder
and random collateral blobs. Example counts are kept small for CI.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave.attestation.dcap import decode_quote_text, parse_quote, verify_quote
from enclave.attestation.dcap_collateral import COLLATERAL_NAMES, parse_collateral
from enclave.errors import EvidenceError

from .test_dcap_vectors import at, quote_bytes, vector

QUOTES = ["tdx/dcapqvl_tdx_quote.bin", "tdx/dcapqvl_tdx_quote_outdated.bin", "sgx/dcapqvl_sgx_quote.bin"]
FUZZ = settings(max_examples=80, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
NOW = at("2025-06-20")


@FUZZ
@given(name=st.sampled_from(QUOTES), data=st.data())
def test_every_truncation_is_refused_and_every_extension_parses(name: str, data: st.DataObject) -> None:
    raw = quote_bytes(name)
    size = parse_quote(raw).size
    cut = data.draw(st.integers(0, size - 1), label="cut")
    with pytest.raises(EvidenceError):
        parse_quote(raw[:cut])
    extra = data.draw(st.binary(max_size=64), label="extra")
    assert parse_quote(raw[:size] + extra).trailing_bytes == len(extra)


@FUZZ
@given(name=st.sampled_from(QUOTES), data=st.data())
def test_overwritten_bytes_give_evidence_errors_only(name: str, data: st.DataObject) -> None:
    original = quote_bytes(name)
    parsed = parse_quote(original)
    raw = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4), label="writes")):
        at_ = data.draw(st.integers(0, parsed.size - 1), label="offset")
        chunk = data.draw(st.binary(min_size=1, max_size=4), label="bytes")
        raw[at_ : at_ + len(chunk)] = chunk
    signed_changed = raw[: len(parsed.signed_bytes)] != original[: len(parsed.signed_bytes)]
    try:
        verify_quote(bytes(raw), now=NOW)
    except EvidenceError:
        return
    # Anything else than EvidenceError fails the test by itself; a verifying quote must not
    # differ from the original in what the attestation key signed.
    assert not signed_changed, "a quote with changed signed bytes verified"


_LENGTH_FIELDS = {
    # (offset in dcapqvl_tdx_quote.bin, struct format): signature data length, certification
    # data size (type 6), QE auth data size, PCK chain size (type 5).
    "signature_data_len": (632, "<I"),
    "certification_data.size": (766, "<I"),
    "qe_auth_data.size": (1218, "<H"),
    "pck_certification_data.size": (1254, "<I"),
}


@FUZZ
@given(field=st.sampled_from(sorted(_LENGTH_FIELDS)), value=st.integers(0, 2**32 - 1))
def test_length_fields_are_honoured_or_refused(field: str, value: int) -> None:
    raw = bytearray(vector("tdx/dcapqvl_tdx_quote.bin"))
    offset, fmt = _LENGTH_FIELDS[field]
    original = struct.unpack_from(fmt, raw, offset)[0]
    value %= 2 ** (8 * struct.calcsize(fmt))
    struct.pack_into(fmt, raw, offset, value)
    if value == original:
        parse_quote(bytes(raw))
    else:
        with pytest.raises(EvidenceError):
            parse_quote(bytes(raw))


def test_length_field_offsets_are_where_the_fuzzer_expects() -> None:
    raw = vector("tdx/dcapqvl_tdx_quote.bin")
    quote = parse_quote(raw)
    assert struct.unpack_from("<I", raw, 632)[0] == quote.size - 636
    assert struct.unpack_from("<H", raw, 764)[0] == 6
    assert struct.unpack_from("<H", raw, 1218)[0] == len(quote.qe_auth_data)
    assert struct.unpack_from("<I", raw, 1254)[0] == len(quote.pck_chain_pem)


@FUZZ
@given(st.binary(max_size=6000))
def test_random_bytes_give_evidence_errors_only(data: bytes) -> None:
    try:
        parse_quote(data)
    except EvidenceError:
        pass


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300), st.text(alphabet="0123456789abcdefxX \n", max_size=300).map(str.encode)
    )
)
def test_hex_decoder_gives_evidence_errors_only(data: bytes) -> None:
    try:
        decoded = decode_quote_text(data)
    except EvidenceError:
        return
    assert isinstance(decoded, bytes)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(COLLATERAL_NAMES),
        st.one_of(
            st.binary(max_size=200),
            st.just(b'{"tcbInfo":{"version":3},"signature":"' + b"00" * 64 + b'"}'),
            st.just(b'{"enclaveIdentity":[],"signature":"' + b"ab" * 64 + b'"}'),
            st.text(max_size=200).map(str.encode),
        ),
        max_size=4,
    )
)
def test_random_collateral_gives_evidence_errors_only(collateral: dict[str, bytes]) -> None:
    try:
        parse_collateral(collateral)
        verify_quote(vector("tdx/dcapqvl_tdx_quote.bin"), now=NOW, collateral=collateral)
    except EvidenceError:
        pass


def test_deeply_nested_json_is_refused_not_a_recursion_error() -> None:
    depth = 100_000
    text = b'{"tcbInfo":' + b"[" * depth + b"]" * depth + b',"signature":"' + b"00" * 64 + b'"}'
    with pytest.raises(EvidenceError):
        parse_collateral({"tcb_info": text, "tcb_info_issuer_chain": b"x"})
