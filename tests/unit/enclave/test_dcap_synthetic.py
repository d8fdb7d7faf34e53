"""DCAP verification against a PKI of our own: root -> PCK CA -> PCK leaf, and a TCB Signing cert.

The real vectors cannot exercise revocation (Intel's CRLs list none of their
certificates), every TCB status, or a Revoked level; a test PKI with the same
shape can. Each test builds a genuine quote and collateral with ``cryptography``
and passes our root as the trust anchor.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclave.attestation.dcap import verify_quote
from enclave.attestation.dcap_tcb import NON_TERMINAL_STATUSES
from enclave.attestation.interface import Evidence
from enclave.attestation.tdx import TdxVerifier
from enclave.errors import BindingError, EvidenceError
from testkit.dcap import (
    FMSPC,
    NOW,
    PCESVN,
    SGX_COMPS,
    Pki,
    Spec,
    build_quote,
    collateral,
    crl,
    level,
    new_key,
    qe_identity,
    signed,
    tcb_info,
)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def verify(pki: Pki, quote: bytes, coll: dict[str, bytes] | None = None, **kw: Any) -> Any:
    return verify_quote(quote, now=kw.pop("now", NOW), collateral=coll, trust_anchor=pki.root_der, **kw)


# --- tests ------------------------------------------------------------------------------------


def test_genuine_synthetic_quote_verifies_with_every_check(pki: Pki) -> None:
    result = verify(pki, build_quote(pki), collateral(pki))
    assert result.tcb_status == "UpToDate"
    assert result.checks_not_done == {}
    assert set(result.checks_done) >= {
        "pck_chain",
        "root_ca_crl",
        "pck_crl",
        "tcb_info",
        "qe_identity",
        "tcb_level",
    }
    assert result.details()["fmspc"] == FMSPC.hex()


@pytest.mark.parametrize(
    "spec",
    [Spec(version=5, body_type=2), Spec(version=5, body_type=3), Spec(trailing=b"\x00" * 70)],
    ids=["v5-td10", "v5-td15", "trailing-zeros"],
)
def test_quote_layouts(pki: Pki, spec: Spec) -> None:
    result = verify(pki, build_quote(pki, spec), collateral(pki))
    assert result.quote.trailing_bytes == len(spec.trailing)
    assert result.tcb_status == "UpToDate"


@pytest.mark.parametrize(
    "spec",
    [Spec(version=3, body_type=1), Spec(version=4, body_type=1), Spec(version=5, body_type=1)],
    ids=["v3", "v4", "v5"],
)
def test_sgx_quote_with_tcb_info_v2(pki: Pki, spec: Spec) -> None:
    v2_level = {
        "tcb": {**{f"sgxtcbcomp{i + 1:02d}svn": c for i, c in enumerate(SGX_COMPS)}, "pcesvn": PCESVN},
        "tcbDate": "2025-01-01T00:00:00Z",
        "tcbStatus": "SWHardeningNeeded",
        "advisoryIDs": ["INTEL-SA-00615"],
    }
    info = tcb_info([v2_level], id="SGX")
    del info["id"]
    info["version"] = 2
    coll = collateral(
        pki,
        tcb_info=signed(pki, "tcbInfo", info),
        qe_identity=signed(pki, "enclaveIdentity", qe_identity([(4, "UpToDate")], id="QE", isvprodid=1)),
    )
    result = verify(pki, build_quote(pki, spec), coll)
    assert result.tcb_status == "SWHardeningNeeded"
    assert result.tcb is not None
    assert result.tcb.advisory_ids == ("INTEL-SA-00615",)


def test_crls_may_be_pem_or_hex(pki: Pki) -> None:
    root_crl = x509.load_der_x509_crl(crl(pki.root, pki.root_key)).public_bytes(serialization.Encoding.PEM)
    coll = collateral(pki, root_ca_crl=root_crl, pck_crl=crl(pki.ca, pki.ca_key).hex().encode())
    assert {"root_ca_crl", "pck_crl"} <= set(verify(pki, build_quote(pki), coll).checks_done)


def test_the_pinned_intel_root_refuses_a_foreign_chain(pki: Pki) -> None:
    with pytest.raises(EvidenceError, match="not the trusted root"):
        verify_quote(build_quote(pki), now=NOW)


def test_revoked_pck_certificate_is_refused(pki: Pki) -> None:
    coll = collateral(pki, pck_crl=crl(pki.ca, pki.ca_key, [pki.leaf.serial_number]))
    with pytest.raises(EvidenceError, match="revoked by the PCK CRL"):
        verify(pki, build_quote(pki), coll)


def test_crl_signed_by_another_key_is_refused(pki: Pki) -> None:
    coll = collateral(pki, pck_crl=crl(pki.ca, new_key(), [pki.leaf.serial_number]))
    with pytest.raises(EvidenceError, match="pck_crl signature does not verify"):
        verify(pki, build_quote(pki), coll)


def test_pck_ca_revoked_by_the_root_crl_is_refused(pki: Pki) -> None:
    coll = collateral(pki, root_ca_crl=crl(pki.root, pki.root_key, [pki.ca.serial_number]))
    with pytest.raises(EvidenceError, match=r"PCK CA certificate .* is revoked by the Root CA CRL"):
        verify(pki, build_quote(pki), coll)


def test_tcb_signing_certificate_revoked_by_the_root_crl_is_refused(pki: Pki) -> None:
    coll = collateral(pki, root_ca_crl=crl(pki.root, pki.root_key, [pki.signing.serial_number]))
    with pytest.raises(EvidenceError, match=r"tcb_info signer certificate .* is revoked"):
        verify(pki, build_quote(pki), coll)


def test_pck_crl_of_another_ca_is_refused(pki: Pki) -> None:
    coll = collateral(pki, pck_crl=crl(pki.root, pki.root_key))
    with pytest.raises(EvidenceError, match="not by the expected CA"):
        verify(pki, build_quote(pki), coll)


@pytest.mark.parametrize("status", NON_TERMINAL_STATUSES)
def test_each_tcb_status_is_reported(pki: Pki, status: str) -> None:
    higher = level(sgx=(9,) * 16, date="2025-06-01T00:00:00Z")  # first level: the platform is below it
    info = tcb_info([higher, level(status, advisories=["INTEL-SA-00001"])])
    result = verify(pki, build_quote(pki), collateral(pki, tcb_info=signed(pki, "tcbInfo", info)))
    assert result.tcb_status == status
    assert result.details()["advisory_ids"] == ["INTEL-SA-00001"]


def test_revoked_tcb_level_is_refused(pki: Pki) -> None:
    coll = collateral(pki, tcb_info=signed(pki, "tcbInfo", tcb_info([level("Revoked")])))
    with pytest.raises(EvidenceError, match="Revoked"):
        verify(pki, build_quote(pki), coll)


def test_platform_below_every_level_is_refused(pki: Pki) -> None:
    coll = collateral(pki, tcb_info=signed(pki, "tcbInfo", tcb_info([level(pcesvn=PCESVN + 1)])))
    with pytest.raises(EvidenceError, match="no matching TCB level"):
        verify(pki, build_quote(pki), coll)


def test_module_svn_bytes_count_only_for_module_major_version_zero(pki: Pki) -> None:
    """Intel's isTdxTcbHigherOrEqual: TEE_TCB_SVN[0:2] are the module's when [1] != 0."""
    strict = tcb_info([level(tdx=bytes([9, 0, 5]) + bytes(13))])
    with pytest.raises(EvidenceError, match="no matching TCB level"):
        verify(pki, build_quote(pki), collateral(pki, tcb_info=signed(pki, "tcbInfo", strict)))
    module = {
        "id": "TDX_01",
        "mrsigner": "00" * 48,
        "attributes": "00" * 8,
        "attributesMask": "FF" * 8,
        "tcbLevels": [
            {"tcb": {"isvsvn": 4}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
            {"tcb": {"isvsvn": 2}, "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": "OutOfDate"},
        ],
    }
    major1 = tcb_info([level(tdx=bytes([9, 0, 5]) + bytes(13))], modules=[module])
    spec = Spec(tee_tcb_svn=bytes([3, 1, 5]) + bytes(13))
    result = verify(pki, build_quote(pki, spec), collateral(pki, tcb_info=signed(pki, "tcbInfo", major1)))
    assert result.tcb is not None
    assert result.tcb.tdx_module is not None
    assert result.tcb.tdx_module.status == "OutOfDate"  # module SVN 3: the isvsvn 2 level
    assert result.tcb_status == "OutOfDate"  # UpToDate platform folded with an OutOfDate module


def test_module_major_version_without_identity_is_a_mismatch(pki: Pki) -> None:
    spec = Spec(tee_tcb_svn=bytes([3, 1, 5]) + bytes(13))
    with pytest.raises(EvidenceError, match="no TDX module identity TDX_01"):
        verify(pki, build_quote(pki, spec), collateral(pki))


def test_tdx_module_signer_mismatch_is_refused(pki: Pki) -> None:
    with pytest.raises(EvidenceError, match="TDX module mismatch: MRSIGNERSEAM"):
        verify(pki, build_quote(pki, Spec(mrsignerseam=b"\x01" * 48)), collateral(pki))


@pytest.mark.parametrize(
    ("platform_status", "expected"),
    [("UpToDate", "OutOfDate"), ("ConfigurationNeeded", "OutOfDateConfigurationNeeded")],
)
def test_out_of_date_qe_folds_into_the_status(pki: Pki, platform_status: str, expected: str) -> None:
    coll = collateral(
        pki,
        tcb_info=signed(pki, "tcbInfo", tcb_info([level(platform_status)])),
        qe_identity=signed(pki, "enclaveIdentity", qe_identity([(8, "UpToDate"), (2, "OutOfDate")])),
    )
    result = verify(pki, build_quote(pki), coll)
    assert result.tcb_status == expected
    assert result.tcb is not None
    assert result.tcb.qe is not None
    assert result.tcb.qe.status == "OutOfDate"


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        (qe_identity([(8, "UpToDate")]), "no matching QE identity TCB level"),
        (qe_identity([(4, "Revoked")]), "QE status is Revoked"),
        (qe_identity([(4, "UpToDate")], mrsigner="AB" * 32), "QE identity mismatch: MRSIGNER"),
        (qe_identity([(4, "UpToDate")], isvprodid=1), "QE identity mismatch: ISVPRODID"),
        (qe_identity([(4, "UpToDate")], id="QE"), "needs 'TD_QE'"),
    ],
    ids=["below-every-level", "revoked", "mrsigner", "isvprodid", "sgx-identity"],
)
def test_qe_identity_refusals(pki: Pki, identity: dict[str, Any], message: str) -> None:
    coll = collateral(pki, qe_identity=signed(pki, "enclaveIdentity", identity))
    with pytest.raises(EvidenceError, match=message):
        verify(pki, build_quote(pki), coll)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"tcb_info": "fmspc"}, "tcb_info is for FMSPC", id="other-fmspc"),
        pytest.param({"tcb_info": "sgx"}, "tcb_info is for SGX", id="sgx-tcb-info"),
        pytest.param(
            {"tcb_info": "foreign-signer"}, "tcb_info signature does not verify", id="foreign-signer"
        ),
        pytest.param(
            {"tcb_info_issuer_chain": "pck-ca"}, "leaf is 'Intel SGX PCK Platform CA'", id="ca-signs"
        ),
        pytest.param({"tcb_info": "issued-later"}, "after the verification time", id="issued-later"),
        pytest.param({"tcb_info_issuer_chain": None}, "needs 'tcb_info_issuer_chain'", id="no-chain"),
        pytest.param({"tcb_info": None}, "'tcb_info_issuer_chain' is given without", id="chain-only"),
        pytest.param({"quote_collateral": "{}"}, "either 'quote_collateral' or", id="both-forms"),
        pytest.param({"tcbinfo": "typo"}, "unknown DCAP collateral", id="unknown-name"),
        pytest.param(
            {"pck_crl_issuer_chain": "root"}, "does not start with the quote's PCK CA", id="crl-chain"
        ),
    ],
)
def test_collateral_refusals(pki: Pki, overrides: dict[str, str | None], message: str) -> None:
    pem = serialization.Encoding.PEM
    values: dict[str, bytes | None] = {
        "fmspc": signed(pki, "tcbInfo", tcb_info([level()], fmspc="00A06D080000")),
        "sgx": signed(pki, "tcbInfo", tcb_info([level(tdx=None)], id="SGX")),
        "foreign-signer": signed(pki, "tcbInfo", tcb_info([level()]), signer=new_key()),
        "pck-ca": pki.ca.public_bytes(pem) + pki.root.public_bytes(pem),
        "issued-later": signed(pki, "tcbInfo", tcb_info([level()], issued="2026-01-20T00:00:00Z")),
        "{}": b"{}",
        "typo": b"x",
        "root": pki.root.public_bytes(pem),
    }
    changes = {k: (values[v] if v is not None else None) for k, v in overrides.items()}
    with pytest.raises(EvidenceError, match=message):
        verify(pki, build_quote(pki), collateral(pki, **changes))


def test_expired_collateral_is_refused_unless_accepted(pki: Pki) -> None:
    later = NOW + timedelta(days=60)
    with pytest.raises(EvidenceError, match="pck_crl expired"):
        verify(pki, build_quote(pki), collateral(pki), now=later)
    result = verify(pki, build_quote(pki), collateral(pki), now=later, accept_expired_collateral=True)
    assert len([w for w in result.warnings if "expired" in w]) == 4  # both CRLs, TCB info, QE identity


def test_expired_pck_certificate_is_refused(pki: Pki) -> None:
    leaf = pki.make_leaf(not_after=NOW - timedelta(days=1))
    with pytest.raises(EvidenceError, match=r"'Intel SGX PCK Certificate' is not valid at .*: expired"):
        verify(pki, build_quote(pki, leaf=leaf))


def test_certificate_with_a_negative_serial_is_malformed_not_a_warning(pki: Pki) -> None:
    """cryptography warns (CryptographyDeprecationWarning) on such a serial; the verifier refuses it."""
    der = pki.make_leaf(serial=0x42).public_bytes(serialization.Encoding.DER)
    at = der.index(b"\x02\x01\x42")
    bad = der[:at] + b"\x02\x01\xc2" + der[at + 3 :]  # serial -62
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n"
    chain = pem + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (pki.ca, pki.root))
    with pytest.raises(EvidenceError, match=r"PCK certificate chain is malformed: .*serial number"):
        verify(pki, build_quote(pki, chain_pem=chain))


def test_debug_td_claim_and_verifier_policy(pki: Pki) -> None:
    spec = Spec(td_attributes=b"\x01" + bytes(7))
    quote = build_quote(pki, spec)
    result = verify(pki, quote, collateral(pki))
    assert result.details()["debug"] is True
    evidence = Evidence(platform="tdx", parts={"quote": quote})
    with pytest.raises(EvidenceError, match="DEBUG TD"):
        TdxVerifier(trust_anchor=pki.root_der).verify(evidence, report_data=spec.report_data, now=NOW)
    claims = TdxVerifier(trust_anchor=pki.root_der, allow_debug=True).verify(
        evidence, report_data=spec.report_data, now=NOW, collateral=collateral(pki)
    )
    assert claims.details["debug"] is True
    assert claims.registers["td_attributes"] == spec.td_attributes
    with pytest.raises(BindingError):
        TdxVerifier(trust_anchor=pki.root_der, allow_debug=True).verify(
            evidence, report_data=bytes(64), now=NOW
        )
