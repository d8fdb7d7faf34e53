"""Property tests: the TPM and Azure HCL parsers raise only ``EvidenceError``, and quickly.

Inputs are random bytes, truncations of the real samples in ../shared/vectors,
and samples with random bytes overwritten. A mutated quote never verifies.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave.attestation.az_vtpm import parse_hcl_report
from enclave.attestation.tpm import parse_pcr_values, verify_quote
from enclave.attestation.tpm_ak import load_ak
from enclave.attestation.tpm_structures import parse_attest, parse_public, parse_signature
from enclave.errors import AttestationError, EvidenceError

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def vector(name: str) -> bytes:
    path = VECTORS / name
    if not path.is_file():
        pytest.fail(f"test vector {path} is missing: the shared vectors must be checked out next to the repo")
    return path.read_bytes()


def _trustee() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(vector("tpm/trustee_tpm_evidence.json"))
    return doc


def _gce_ak_pub() -> bytes:
    # Field 1 of the go-tpm-tools Attestation: tag 0x0a, a two-byte varint length, the TPMT_PUBLIC.
    data = vector("tpm/gotpmtools_gce-cos-85-no-nonce.pb")
    assert data[0] == 0x0A
    size = (data[1] & 0x7F) | data[2] << 7
    return data[3 : 3 + size]


SAMPLES: dict[str, tuple[Callable[[], bytes], Callable[[bytes], object]]] = {
    "attest": (lambda: vector("tpm/derived_keylime_quote.tpms_attest.bin"), parse_attest),
    "signature": (lambda: vector("tpm/derived_keylime_quote.tpmt_signature.bin"), parse_signature),
    "public": (_gce_ak_pub, parse_public),
    "ak-spki": (lambda: base64.b64decode(_trustee()["ak_public"]), load_ak),
    "ak-pem": (lambda: vector("tpm/derived_keylime_quote.ak_pub.pem"), load_ak),
    "pcr-json": (lambda: json.dumps({"sha256": {"0": "00" * 32, "7": "ff" * 32}}).encode(), parse_pcr_values),
    "hcl-report": (lambda: vector("az-vtpm/trustee_az-snp-vtpm_hcl-report.bin"), parse_hcl_report),
}


def _only_evidence_errors(parse: Callable[[bytes], object], data: bytes) -> None:
    try:
        parse(data)
    except EvidenceError:
        pass


@pytest.mark.parametrize("name", list(SAMPLES))
@FUZZ
@given(data=st.data())
def test_parsers_raise_only_evidence_error(name: str, data: st.DataObject) -> None:
    load, parse = SAMPLES[name]
    sample = load()
    parse(sample)  # the genuine sample parses
    kind = data.draw(st.sampled_from(["random", "truncated", "overwritten"]))
    if kind == "random":
        candidate = data.draw(st.binary(max_size=2 * len(sample)))
    elif kind == "truncated":
        candidate = sample[: data.draw(st.integers(0, len(sample) - 1))]
    else:
        mutated = bytearray(sample)
        for _ in range(data.draw(st.integers(1, 4))):
            mutated[data.draw(st.integers(0, len(sample) - 1))] = data.draw(st.integers(0, 255))
        candidate = bytes(mutated)
    _only_evidence_errors(parse, candidate)


@FUZZ
@given(position=st.integers(0, 132), value=st.integers(1, 255))
def test_overwritten_quote_byte_never_verifies(position: int, value: int) -> None:
    doc = _trustee()
    quote = bytearray(base64.b64decode(doc["tpm_quote"]["message"]))
    quote[position % len(quote)] ^= value
    pcrs = {"sha256": {i: bytes.fromhex(v) for i, v in enumerate(doc["tpm_quote"]["pcrs"])}}
    with pytest.raises(AttestationError):
        verify_quote(
            bytes(quote),
            base64.b64decode(doc["tpm_quote"]["signature"]),
            base64.b64decode(doc["ak_public"]),
            pcrs,
        )
