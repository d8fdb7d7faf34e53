"""Instances in one log: the verifier replays every instance's entries and appraises the current one's.

A platform whose register outlives its attester (a TPM PCR) is played here by
the sim attester kept across instances, so these run without a TPM; the swtpm
version is tests/unit/custodian/test_reenrolment_tpm.py.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from enclave._daemon.errors import ConfigError
from enclave._daemon.measured import MeasuredIdentity
from enclave.attestation import AttestedClaims, appraise
from enclave.attestation.appraisal import Appraisal
from enclave.attestation.measurement import code_event, config_event, model_event
from enclave.attestation.sim import SimAttester
from enclave.errors import PolicyError

from ._sim_evidence import CA_DER, MODEL_SHA384, reference


class _LastingSimAttester(SimAttester):
    """A sim attester whose register a successor goes on from, as a TPM PCR does."""

    register_outlives_attester = True

    def continue_log(self, register_values: Mapping[str, bytes]) -> None:
        assert self._registers["sim.app"] == register_values["sha384"]


def _instance(
    attester: SimAttester, earlier: MeasuredIdentity | None = None, *, model: bool
) -> MeasuredIdentity:
    identity = earlier.successor(attester) if earlier else MeasuredIdentity(attester, "demo")
    identity.measure(code_event())
    identity.measure(config_event(CA_DER))
    if model:
        identity.measure(model_event(MODEL_SHA384))
    return identity


def _appraise(attester: SimAttester, claims: AttestedClaims, **options: object) -> Appraisal:
    evidence = attester.collect(claims.report_data()).to_bytes()
    return appraise(
        evidence,
        claims.to_bytes(),
        reference(),
        now=datetime.now(UTC),
        nonce=claims.nonce,
        public_key=claims.public_key,
        purpose="enrol",
        **options,  # type: ignore[arg-type]
    )


def _claims(identity: MeasuredIdentity) -> AttestedClaims:
    return AttestedClaims.from_bytes(identity.attest("enrol", os.urandom(32))[1])


def test_the_current_instance_is_appraised_after_the_earlier_one_replays() -> None:
    attester = _LastingSimAttester()
    first = _instance(attester, model=True)
    _claims(first)
    second = _instance(attester, first, model=False)
    claims = _claims(second)
    assert [e.kind for e in claims.log] == [
        "instance",
        "code",
        "config",
        "model",
        "instance",
        "code",
        "config",
    ]
    appraisal = _appraise(attester, claims)
    assert appraisal.model_sha384 is None  # the earlier instance's model is not this one's
    with pytest.raises(PolicyError, match="no model"):
        _appraise(attester, claims, require_model=True)


def test_the_earlier_key_cannot_attest_with_the_later_instances_log() -> None:
    attester = _LastingSimAttester()
    first = _instance(attester, model=True)
    _claims(first)
    second = _instance(attester, first, model=True)
    stolen = replace(_claims(second), public_key=first.public_key_der)
    with pytest.raises(PolicyError, match="another key or deployment"):
        _appraise(attester, stolen)


def test_entries_before_the_first_instance_are_refused() -> None:
    attester = SimAttester()
    identity = _instance(SimAttester(), model=False)
    log = identity.log
    claims = replace(_claims(identity), log=(code_event(), *log))
    for event in claims.log:
        attester.extend(event.digests())
    with pytest.raises(PolicyError, match="entries before its first instance"):
        _appraise(attester, claims)


def test_an_instance_entry_that_does_not_match_its_detail_is_refused() -> None:
    attester = SimAttester()
    identity = _instance(SimAttester(), model=False)
    claims = _claims(identity)
    forged = replace(claims.log[0], sha384=hashlib.sha384(b"other").digest())
    claims = replace(claims, log=(forged, *claims.log[1:]))
    for event in claims.log:
        attester.extend(event.digests())
    with pytest.raises(PolicyError, match="instance measurement does not match"):
        _appraise(attester, claims)


def _reenrol_forever(attester: SimAttester, instances: list[MeasuredIdentity]) -> None:
    while True:
        _claims(instances[-1])  # each instance attests once, so its entries are in the register
        instances.append(_instance(attester, instances[-1], model=False))


def test_a_log_too_long_to_carry_is_refused_with_the_remedy() -> None:
    attester = _LastingSimAttester()
    instances = [_instance(attester, model=False)]
    with pytest.raises(ConfigError, match="restart the machine"):
        _reenrol_forever(attester, instances)
    # After many more zeroizations than a boot sees, and before the claims' own 64 KiB limit.
    assert len(instances) > 40
    assert len(_claims(instances[-1]).to_bytes()) < 64 * 1024


def test_a_platform_whose_register_starts_afresh_carries_nothing_over() -> None:
    first = _instance(SimAttester(), model=True)
    _claims(first)
    second = first.successor(SimAttester())
    assert [e.kind for e in second.log] == ["instance"]
