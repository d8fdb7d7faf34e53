"""The tpm appraisals kept from enrolment to credential activation: taken once, bounded, expiring."""

from __future__ import annotations

import datetime

import pytest

from custodian.appraisals import Appraised, PendingAppraisals
from enclave.attestation.appraisal import Appraisal
from enclave.attestation.claims import AttestedClaims
from enclave.attestation.interface import PlatformClaims

NOW = datetime.datetime(2026, 12, 5, 12, 0, tzinfo=datetime.UTC)
TTL = datetime.timedelta(seconds=60)


def _appraised(tag: str, at: datetime.datetime = NOW) -> Appraised:
    claims = AttestedClaims(
        nonce=b"\1" * 32, public_key=b"k", deployment="d", platform="tpm", purpose="enrol", log=()
    )
    platform = PlatformClaims(
        platform="tpm", report_data=b"", registers={}, simulated=False, log_register=None, log_hash="sha256"
    )
    return Appraised(tag.encode(), b"claims", Appraisal(claims, platform), at + TTL)


def test_an_appraisal_is_taken_once() -> None:
    pending = PendingAppraisals()
    pending.keep(b"a", _appraised("a"), NOW)
    taken = pending.take(b"a", NOW)
    assert taken is not None
    assert taken.evidence == b"a"
    assert pending.take(b"a", NOW) is None
    assert pending.take(b"never kept", NOW) is None
    assert len(pending) == 0


def test_an_expired_appraisal_is_not_given_and_is_forgotten() -> None:
    pending = PendingAppraisals()
    pending.keep(b"old", _appraised("old"), NOW)
    assert pending.take(b"old", NOW + TTL + datetime.timedelta(seconds=1)) is None
    pending.keep(b"a", _appraised("a"), NOW)
    pending.keep(b"b", _appraised("b", NOW + TTL), NOW + TTL + datetime.timedelta(seconds=1))
    assert len(pending) == 1  # "a" expired when "b" came


def test_the_oldest_are_dropped_past_the_limit() -> None:
    pending = PendingAppraisals(limit=3)
    for i in range(5):
        pending.keep(bytes([i]), _appraised(str(i)), NOW)
    assert len(pending) == 3
    assert [pending.take(bytes([i]), NOW) is not None for i in range(5)] == [False, False, True, True, True]


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PendingAppraisals(limit=0)
