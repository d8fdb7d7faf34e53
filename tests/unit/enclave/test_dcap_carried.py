"""DCAP collateral carried in the evidence, the relying party's fresher copy, and the TCB evaluation floor."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from enclave.attestation.dcap_freshness import CARRIED, MAX_CARRIED_BYTES, OWN, attach
from enclave.attestation.interface import Evidence
from enclave.attestation.manifest import ReferenceValues
from enclave.attestation.platforms import manifest_verifier
from enclave.attestation.tdx import TdxVerifier
from enclave.errors import EvidenceError, ManifestError
from testkit.dcap import NOW, Pki, build_quote, collateral, crl, level, qe_identity, signed, tcb_info

REPORT_DATA = b"\x42" * 64


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def _verify(pki: Pki, carried: dict[str, bytes], own: dict[str, bytes] | None = None, **kw: Any) -> Any:
    evidence = Evidence(platform="tdx", parts=attach({"quote": build_quote(pki)}, carried))
    verifier = TdxVerifier(trust_anchor=pki.root_der, **kw)
    return verifier.verify(evidence, report_data=REPORT_DATA, now=kw.pop("now", NOW), collateral=own)


def _older_tcb_info(pki: Pki) -> bytes:
    old = tcb_info([level()], issued="2025-12-01T00:00:00Z", next="2026-01-01T00:00:00Z", evaluation=16)
    return signed(pki, "tcbInfo", old)


def test_collateral_carried_in_the_evidence_is_used_in_full(pki: Pki) -> None:
    claims = _verify(pki, collateral(pki))
    assert claims.details["tcb_status"] == "UpToDate"
    assert claims.details["checks_not_done"] == {}
    assert set(claims.details["collateral_sources"].values()) == {CARRIED}


def test_expired_carried_collateral_is_refused_without_a_fresher_copy(pki: Pki) -> None:
    with pytest.raises(EvidenceError, match="tcb_info expired"):
        _verify(pki, collateral(pki, tcb_info=_older_tcb_info(pki)))


def test_the_relying_partys_fresher_copy_replaces_expired_carried_collateral(pki: Pki) -> None:
    own = collateral(pki)
    claims = _verify(pki, collateral(pki, tcb_info=_older_tcb_info(pki)), own)
    sources = claims.details["collateral_sources"]
    assert sources["tcb_info"] == OWN
    assert claims.details["tcb_status"] == "UpToDate"


def test_fresher_carried_collateral_beats_the_relying_partys_older_copy(pki: Pki) -> None:
    own = collateral(pki, tcb_info=_older_tcb_info(pki))
    claims = _verify(pki, collateral(pki), own)
    assert claims.details["collateral_sources"]["tcb_info"] == CARRIED


def test_a_higher_evaluation_number_is_fresher_than_a_later_issue_date(pki: Pki) -> None:
    recovery = tcb_info([level()], issued="2026-01-05T00:00:00Z", evaluation=18)
    later = tcb_info([level()], issued="2026-01-12T00:00:00Z", evaluation=17)
    claims = _verify(
        pki,
        collateral(pki, tcb_info=signed(pki, "tcbInfo", later)),
        collateral(pki, tcb_info=signed(pki, "tcbInfo", recovery)),
    )
    assert claims.details["collateral_sources"]["tcb_info"] == OWN


def test_a_newer_crl_wins_piece_by_piece(pki: Pki) -> None:
    newer = crl(pki.ca, pki.ca_key, [pki.leaf.serial_number], this=NOW - timedelta(hours=1))
    with pytest.raises(EvidenceError, match="revoked by the PCK CRL"):
        _verify(pki, collateral(pki), collateral(pki, pck_crl=newer))


@pytest.mark.parametrize(
    ("minimum", "refused"), [(17, False), (18, True)], ids=["at-the-floor", "below-the-floor"]
)
def test_collateral_below_the_manifests_evaluation_floor_is_refused(
    pki: Pki, minimum: int, refused: bool
) -> None:
    if refused:
        with pytest.raises(
            EvidenceError, match="evaluation data number 17; the manifest requires at least 18"
        ):
            _verify(pki, collateral(pki), min_tcb_evaluation_data_number=minimum)
    else:
        _verify(pki, collateral(pki), min_tcb_evaluation_data_number=minimum)


def test_the_floor_applies_to_the_qe_identity_too(pki: Pki) -> None:
    old_identity = signed(pki, "enclaveIdentity", qe_identity([(4, "UpToDate")], evaluation=16))
    newer_info = signed(pki, "tcbInfo", tcb_info([level()], evaluation=18))
    with pytest.raises(EvidenceError, match="qe_identity has TCB evaluation data number 16"):
        _verify(
            pki,
            collateral(pki, tcb_info=newer_info, qe_identity=old_identity),
            min_tcb_evaluation_data_number=18,
        )


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"vcek": b"x"}, "unknown parts"),
        ({"collateral.tcb_signing_key": b"x"}, "unknown collateral"),
        ({"collateral.tcb_info": b"x" * (MAX_CARRIED_BYTES + 1)}, "over the"),
    ],
    ids=["foreign-part", "unknown-collateral-name", "oversized"],
)
def test_evidence_parts_are_bounded_and_known(pki: Pki, parts: dict[str, bytes], message: str) -> None:
    evidence = Evidence(platform="tdx", parts={"quote": build_quote(pki), **parts})
    with pytest.raises(EvidenceError, match=message):
        TdxVerifier(trust_anchor=pki.root_der).verify(evidence, report_data=REPORT_DATA, now=NOW)


def _manifest(extra: str, platform: str = "tdx") -> str:
    names = ("mrtd", "rtmr0", "rtmr1", "rtmr2") if platform == "tdx" else ("measurement",)
    reference = ReferenceValues(
        platform=platform,
        allow_simulation=False,
        custodian_ca_sha256="00" * 32,
        code_sha384="00" * 48,
        registers=dict.fromkeys(names, "00" * 48),
    )
    return reference.to_toml().replace("\n[registers]", f"{extra}\n\n[registers]", 1)


def test_the_manifest_floor_round_trips_and_reaches_the_verifier() -> None:
    reference = ReferenceValues.from_toml(_manifest("min_tcb_evaluation_data_number = 18"))
    assert reference.min_tcb_evaluation_data_number == 18
    assert ReferenceValues.from_toml(reference.to_toml()) == reference
    verifier = manifest_verifier(reference)
    assert isinstance(verifier, TdxVerifier)
    assert verifier.min_tcb_evaluation_data_number == 18


@pytest.mark.parametrize(
    ("extra", "platform"),
    [
        ('min_tcb_evaluation_data_number = "18"', "tdx"),
        ("min_tcb_evaluation_data_number = -1", "tdx"),
        ("min_tcb_evaluation_data_number = true", "tdx"),
        ("min_tcb_evaluation_data_number = 18", "sev-snp"),
    ],
    ids=["string", "negative", "bool", "not-dcap"],
)
def test_a_bad_evaluation_floor_is_refused(extra: str, platform: str) -> None:
    with pytest.raises(ManifestError, match="min_tcb_evaluation_data_number"):
        ReferenceValues.from_toml(_manifest(extra, platform))
