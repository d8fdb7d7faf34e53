"""Property tests: the Nitro document parser and verifier raise ``EvidenceError`` and nothing else.

Inputs: truncations of the real documents, real documents with random bytes
written over them, random bytes, random CBOR structures (hypothesis builds them
from the document's own shape, with wrong types and sizes mixed in), and
random text for the base64 reader. Example counts are kept small for CI.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from enclave._daemon.nitro_attest import nsm_attestation_document
from enclave.attestation import nitro
from enclave.attestation.nitro_document import decode_document_text, parse_document
from enclave.errors import EvidenceError

from .test_nitro_vectors import PRODUCTION, REAL, _document

FUZZ = settings(max_examples=120, deadline=3000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(name=st.sampled_from(REAL), data=st.data())
def test_every_truncation_is_refused(name: str, data: st.DataObject) -> None:
    raw = _document(name)
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    with pytest.raises(EvidenceError):
        nitro.verify_document(raw[:cut])


@FUZZ
@given(name=st.sampled_from(REAL), extra=st.binary(min_size=1, max_size=16))
def test_trailing_bytes_are_refused(name: str, extra: bytes) -> None:
    with pytest.raises(EvidenceError, match="after its CBOR item"):
        parse_document(_document(name) + extra)


@FUZZ
@given(name=st.sampled_from(REAL), data=st.data())
def test_overwritten_bytes_give_evidence_errors_only(name: str, data: st.DataObject) -> None:
    original = _document(name)
    raw = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4), label="writes")):
        at = data.draw(st.integers(0, len(raw) - 1), label="offset")
        chunk = data.draw(st.binary(min_size=1, max_size=4), label="bytes")
        raw[at : at + len(chunk)] = chunk
    try:
        nitro.verify_document(bytes(raw))
    except EvidenceError:
        return
    assert bytes(raw) == original, "a changed document verified"


@FUZZ
@given(raw=st.binary(max_size=512))
def test_random_bytes_give_evidence_errors_only(raw: bytes) -> None:
    with pytest.raises(EvidenceError):
        nitro.verify_document(raw)


@FUZZ
@given(text=st.binary(max_size=256))
def test_text_reader_gives_evidence_errors_only(text: bytes) -> None:
    try:
        decoded = decode_document_text(text)
    except EvidenceError:
        return
    with pytest.raises(EvidenceError):
        nitro.verify_document(decoded)


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.binary(max_size=80),
    st.text(max_size=20),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), inner)
    ),
    max_leaves=12,
)


@FUZZ
@given(data=st.data())
def test_payloads_of_the_wrong_shape_give_evidence_errors_only(data: st.DataObject) -> None:
    """A real document's payload with fields replaced, dropped or added, signed bytes and all."""
    outer = cbor2.loads(_document(PRODUCTION))
    fields: dict[str, Any] = cbor2.loads(outer[2])
    original = dict(fields)
    names = [*fields, "extra", "nitrotpm_pcrs"]
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        name = data.draw(st.sampled_from(names), label="field")
        if data.draw(st.booleans(), label="drop") and name in fields:
            del fields[name]
        else:
            fields[name] = data.draw(_VALUES, label="value")
    assume(fields != original)
    outer[2] = cbor2.dumps(fields)
    with pytest.raises(EvidenceError):
        nitro.verify_document(cbor2.dumps(outer))


@FUZZ
@given(outer=_VALUES)
def test_outer_structures_of_the_wrong_shape_give_evidence_errors_only(outer: Any) -> None:
    with pytest.raises(EvidenceError):
        nitro.verify_document(cbor2.dumps(outer))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not valid CBOR"),
        (cbor2.dumps(cbor2.CBORTag(17, [])), "not COSE_Sign1"),
        (cbor2.dumps([b"", {}, b""]), "array of four"),
        (cbor2.dumps([cbor2.dumps({1: -7}), {}, b"", bytes(96)]), "algorithm ES384"),
        (cbor2.dumps([cbor2.dumps({1: -35}), {4: b"kid"}, b"", bytes(96)]), "unprotected header"),
        (cbor2.dumps([cbor2.dumps({1: -35}), {}, b"", bytes(64)]), "not 96"),
        (cbor2.dumps([cbor2.dumps({1: -35}), {}, cbor2.dumps([1]), bytes(96)]), "map of named fields"),
        (b"\x9f" * 100_000, "over the"),
    ],
    ids=["empty", "tag-17", "three-items", "es256", "unprotected", "short-signature", "payload-list", "huge"],
)
def test_malformed_envelopes_are_named(raw: bytes, message: str) -> None:
    with pytest.raises(EvidenceError, match=message):
        parse_document(raw)


def test_nesting_too_deep_for_the_decoder_is_an_evidence_error() -> None:
    with pytest.raises(EvidenceError):
        parse_document(b"\x81" * 20_000 + b"\x00")


@pytest.mark.parametrize(
    "raw",
    [
        b"\x5b" + (2**62).to_bytes(8, "big"),
        b"\x9b" + (2**62).to_bytes(8, "big"),
        b"\xbb" + (2**62).to_bytes(8, "big"),
        b"\x84\x9b" + (2**40).to_bytes(8, "big"),
    ],
    ids=["bytes", "array", "map", "nested-array"],
)
def test_huge_declared_lengths_are_refused_at_once(raw: bytes) -> None:
    with pytest.raises(EvidenceError, match="not valid CBOR"):
        parse_document(raw)


@FUZZ
@given(response=st.one_of(st.binary(max_size=256), _VALUES.map(cbor2.dumps)))
def test_nsm_responses_give_evidence_errors_only(response: bytes) -> None:
    try:
        document = nsm_attestation_document(response)
    except EvidenceError:
        return
    assert isinstance(document, bytes)


_HUGE = 1 << (8 * 2000)  # a CBOR bignum of 2,000 bytes: past Python's 4,300-digit limit for printing it
_BASE: dict[str, Any] = {
    "module_id": "m",
    "digest": "SHA384",
    "timestamp": 1_700_000_000_000,
    "pcrs": {0: bytes(48), 1: bytes(48), 2: bytes(48)},
    "certificate": b"x",
    "cabundle": [b"x"],
}


@pytest.mark.parametrize(
    ("payload", "header"),
    [
        pytest.param({**_BASE, "timestamp": _HUGE}, {1: -35}, id="timestamp"),
        pytest.param({**_BASE, "pcrs": {_HUGE: bytes(48)}}, {1: -35}, id="pcr-index"),
        pytest.param({**_BASE, "digest": _HUGE}, {1: -35}, id="digest"),
        pytest.param(_BASE, {1: _HUGE}, id="protected-header"),
    ],
)
def test_a_huge_integer_is_named_not_printed(payload: dict[str, Any], header: dict[int, Any]) -> None:
    document = cbor2.dumps([cbor2.dumps(header), {}, cbor2.dumps(payload), bytes(96)])
    with pytest.raises(EvidenceError, match=r"bit integer|dict of 1 items"):
        parse_document(document)
