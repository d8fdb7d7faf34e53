"""4. Attestation: verifying one piece of evidence per platform, and a full enrolment round trip.

Verification: for every platform in ``PLATFORM_CASES`` whose verifier is
registered in ``enclave.attestation.platforms`` at run time, the time
``verifier_for(platform).verify(...)`` takes for one piece of evidence,
against the bare signature checks that evidence needs, done directly with
``cryptography`` (the floor). A platform is one entry in ``PLATFORM_CASES``: a
function that returns a ``Sample`` (the evidence and what the verifier is told,
plus the floor). Real evidence comes from ``../shared/vectors`` (see its
``MANIFEST.md``); a platform whose vectors are absent is reported, not run.

Enrolment round trip: what an enclave does to enrol, on a fresh TLS channel
each time (``GetChallenge``, claims and sim evidence over the nonce, a CSR,
``Enrol``), against the real custodian, which checks the token, the nonce, the
CSR and appraises the evidence against the manifest and records the instance;
the baseline is the same two calls with the same client work against the plain
gRPC server, which checks nothing.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from unittest import mock

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning

from bench._context import Bench
from bench._sim_enclave import SimInstance, stale_code
from bench._stats import Row, alternate, flatten
from bench._tls import SERVER_NAME
from enclave.attestation import AttestedClaims, Evidence, tpm
from enclave.attestation.dcap_quote import parse_quote
from enclave.attestation.measurement import code_event, config_event
from enclave.attestation.nitro_document import parse_document
from enclave.attestation.platforms import PLATFORMS, verifier_for
from enclave.attestation.sim import SimAttester
from enclave.attestation.tpm_ak import load_ak
from enclave.attestation.tpm_structures import parse_attest, parse_signature
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc
from testkit.processes import DIGITS_MODEL, ROOT, stopping

NAME = "attestation"
VECTORS = ROOT.parent / "shared" / "vectors"
_BLOCKS = 10
_ATTEMPTS = 3  # enrolment is tried again in a new deployment when the sources changed meanwhile


class VectorsMissingError(Exception):
    """The real evidence a platform case needs is not on this machine."""


@dataclass(frozen=True)
class Sample:
    """One piece of evidence, what its verifier is told, and the floor: its bare signature checks."""

    evidence: Evidence
    report_data: bytes
    now: datetime.datetime
    collateral: Mapping[str, bytes] | None
    floor: Callable[[], None]
    floor_text: str
    # Recorded evidence whose quote carries the report data itself, not its SHA-256 (tpm).
    raw_qualifying_data: bool = False


def _vector(name: str) -> bytes:
    path = VECTORS / name
    if not path.is_file():
        raise VectorsMissingError(f"{path} is missing")
    return path.read_bytes()


def _sim_sample() -> Sample:
    """Evidence from the simulated attester, over claims with this build's measurement log."""
    attester = SimAttester()
    log = (code_event(), config_event(b"bench custodian CA"))
    for event in log:
        attester.extend(event.digests())
    key = ec.generate_private_key(ec.SECP256R1())
    claims = AttestedClaims(
        nonce=bytes(32),
        public_key=key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        deployment="bench",
        platform="sim",
        purpose="enrol",
        log=log,
    )
    evidence = attester.collect(claims.report_data())
    body, signature = evidence.parts["body"], evidence.parts["signature"]
    platform_key = serialization.load_der_public_key(bytes.fromhex(json.loads(body)["platform_key"]))
    assert isinstance(platform_key, ec.EllipticCurvePublicKey)

    def floor() -> None:
        platform_key.verify(signature, body, ec.ECDSA(hashes.SHA256()))

    return Sample(
        evidence,
        claims.report_data(),
        datetime.datetime.now(datetime.UTC),
        None,
        floor,
        "ECDSA P-256 verify",
    )


def _sev_snp_sample() -> Sample:
    """A real Milan report (trustee's test data) with its VCEK and AMD's Milan ASK/ARK."""
    report = _vector("sev-snp/trustee_test-report.bin")[:0x4A0]
    vcek_der = _vector("sev-snp/trustee_test-vcek.der")
    chain_pem = _vector("sev-snp/trustee_milan_ask_ark_asvk.pem")
    with warnings.catch_warnings():
        # AMD issues VCEKs with serial number 0, which cryptography warns about (as the verifier knows).
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        vcek = x509.load_der_x509_certificate(vcek_der)
    chain = {c.subject.rfc4514_string(): c for c in x509.load_pem_x509_certificates(chain_pem)}
    ask = chain[vcek.issuer.rfc4514_string()]
    ark = chain[ask.issuer.rfc4514_string()]
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    r = int.from_bytes(report[0x2A0 : 0x2A0 + 72], "little")
    s = int.from_bytes(report[0x2A0 + 72 : 0x2A0 + 144], "little")
    signature = encode_dss_signature(r, s)
    vcek_key = vcek.public_key()
    assert isinstance(vcek_key, ec.EllipticCurvePublicKey)

    links = []
    for cert, issuer in ((vcek, ask), (ask, ark), (ark, ark)):
        issuer_key = issuer.public_key()
        assert isinstance(issuer_key, rsa.RSAPublicKey)
        links.append((issuer_key, cert.signature, cert.tbs_certificate_bytes))

    def floor() -> None:
        vcek_key.verify(signature, report[:0x2A0], ec.ECDSA(hashes.SHA384()))
        for key, cert_signature, tbs in links:
            key.verify(cert_signature, tbs, pss, hashes.SHA384())

    return Sample(
        Evidence(platform="sev-snp", parts={"report": report, "vcek": vcek_der}),
        report[0x50:0x90],
        datetime.datetime(2026, 11, 21, tzinfo=datetime.UTC),
        {"cert_chain": chain_pem},
        floor,
        "ECDSA P-384 + 3 RSA-PSS verifies",
    )


def _nitro_enclave_sample() -> Sample:
    """A real Nitro Enclaves document (nitrite's test data, us-east-1), checked at its own time."""
    raw = base64.b64decode(_vector("nitro/blocky_nitro_attestation.b64"))
    document = parse_document(raw)
    chain = [x509.load_der_x509_certificate(der) for der in (*document.cabundle, document.certificate)]
    links = [(chain[max(i - 1, 0)], cert) for i, cert in enumerate(chain)]
    leaf_key = chain[-1].public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
    r, s = int.from_bytes(document.signature[:48], "big"), int.from_bytes(document.signature[48:], "big")
    signature = encode_dss_signature(r, s)
    signed = document.signed_bytes()

    def floor() -> None:
        for issuer, cert in links:
            issuer_key = issuer.public_key()
            assert isinstance(issuer_key, ec.EllipticCurvePublicKey)
            issuer_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA384()))
        leaf_key.verify(signature, signed, ec.ECDSA(hashes.SHA384()))

    assert document.nonce is not None
    return Sample(
        Evidence(platform="nitro-enclave", parts={"document": raw}),
        document.nonce,
        document.timestamp,
        None,
        floor,
        "6 ECDSA P-384 verifies",
    )


def _nitro_tpm_sample() -> Sample:
    raise VectorsMissingError("../shared/vectors has no NitroTPM document (its verifier is nitro-enclave's)")


def _ecdsa_raw(signature: bytes) -> bytes:
    """A raw r || s (big-endian halves) signature as DER."""
    half = len(signature) // 2
    return encode_dss_signature(
        int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
    )


def _verifies(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> Callable[[], None]:
    return lambda: key.verify(signature, data, ec.ECDSA(hashes.SHA256()))


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> Callable[[], None]:
    key = issuer.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return _verifies(key, cert.signature, cert.tbs_certificate_bytes)


def _dcap_sample(platform: str, quote_file: str, collateral_file: str, day: str) -> Sample:
    """A real DCAP quote (SGX or TDX) with dcap-qvl's collateral (every piece: CRLs, TCB info, QE identity).

    The floor is every ECDSA P-256 signature that evidence carries: the quote, the QE report, the PCK
    chain to the root, the TCB info and QE identity with their signing certificate, and both CRLs.
    """
    raw = _vector(quote_file)
    collateral = _vector(collateral_file)
    quote = parse_quote(raw)
    attestation_key = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), b"\x04" + quote.attestation_key
    )
    leaf, pck_ca, root = x509.load_pem_x509_certificates(quote.pck_chain_pem)[:3]
    leaf_key = leaf.public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
    doc = json.loads(collateral)
    tcb_signer = x509.load_pem_x509_certificates(doc["tcb_info_issuer_chain"].encode())[0]
    tcb_key = tcb_signer.public_key()
    assert isinstance(tcb_key, ec.EllipticCurvePublicKey)
    crl_checks = []
    for name, issuer in (("root_ca_crl", root), ("pck_crl", pck_ca)):
        crl = x509.load_der_x509_crl(bytes.fromhex(doc[name]))
        issuer_key = issuer.public_key()
        assert isinstance(issuer_key, ec.EllipticCurvePublicKey)
        crl_checks.append((issuer_key, crl.signature, crl.tbs_certlist_bytes))
    checks: list[Callable[[], None]] = [
        _verifies(attestation_key, _ecdsa_raw(quote.signature), quote.signed_bytes),
        _verifies(leaf_key, _ecdsa_raw(quote.qe_report_signature), quote.qe_report_bytes),
        _issued_by(leaf, pck_ca),
        _issued_by(pck_ca, root),
        _issued_by(root, root),
        _issued_by(tcb_signer, root),
        *(
            _verifies(tcb_key, _ecdsa_raw(bytes.fromhex(doc[f"{k}_signature"])), doc[k].encode())
            for k in ("tcb_info", "qe_identity")
        ),
        *(_verifies(key, sig, tbs) for key, sig, tbs in crl_checks),
    ]

    def floor() -> None:
        for check in checks:
            check()

    return Sample(
        Evidence(platform=platform, parts={"quote": raw}),
        quote.report_data,
        datetime.datetime.fromisoformat(f"{day}T12:00:00+00:00"),
        {"quote_collateral": collateral},
        floor,
        f"{len(checks)} ECDSA P-256 verifies",
    )


def _tpm_sample() -> Sample:
    """A TPM 2.0 quote from trustee's test data (software TPM), its AK and its SHA-256 PCRs."""
    doc = json.loads(_vector("tpm/trustee_tpm_evidence.json"))
    quote = base64.b64decode(doc["tpm_quote"]["message"])
    signature = base64.b64decode(doc["tpm_quote"]["signature"])
    ak = base64.b64decode(doc["ak_public"])
    pcrs = {"sha256": {str(i): v for i, v in enumerate(doc["tpm_quote"]["pcrs"])}}
    parsed = parse_signature(signature)
    key = load_ak(ak).key
    hash_algorithm = {0x000B: hashes.SHA256(), 0x000C: hashes.SHA384(), 0x000D: hashes.SHA512()}[
        parsed.hash_alg
    ]

    def floor() -> None:
        if isinstance(key, rsa.RSAPublicKey):
            scheme = (
                padding.PKCS1v15()
                if parsed.sig_alg == 0x0014
                else padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=padding.PSS.AUTO)
            )
            key.verify(parsed.signature, quote, scheme, hash_algorithm)
        else:
            assert isinstance(key, ec.EllipticCurvePublicKey)
            der = encode_dss_signature(int.from_bytes(parsed.r, "big"), int.from_bytes(parsed.s, "big"))
            key.verify(der, quote, ec.ECDSA(hash_algorithm))

    return Sample(
        Evidence(
            platform="tpm",
            parts={"quote": quote, "signature": signature, "ak": ak, "pcrs": json.dumps(pcrs).encode()},
        ),
        parse_attest(quote).extra_data,
        datetime.datetime(2026, 11, 21, tzinfo=datetime.UTC),
        None,
        floor,
        "1 AK signature verify",
        raw_qualifying_data=True,
    )


# One entry per platform: a verifier registered in enclave.attestation.platforms is benchmarked
# when it has an entry here.
PLATFORM_CASES: dict[str, Callable[[], Sample]] = {
    "sim": _sim_sample,
    "sev-snp": _sev_snp_sample,
    "tdx": lambda: _dcap_sample(
        "tdx", "tdx/dcapqvl_tdx_quote.bin", "tdx/dcapqvl_tdx_quote_collateral.json", "2025-06-20"
    ),
    "sgx": lambda: _dcap_sample(
        "sgx", "sgx/dcapqvl_sgx_quote.bin", "sgx/dcapqvl_sgx_quote_collateral.json", "2025-06-20"
    ),
    "tpm": _tpm_sample,
    "nitro-enclave": _nitro_enclave_sample,
    "nitro-tpm": _nitro_tpm_sample,
}


def run(bench: Bench) -> list[Row]:
    rows = [row for platform in PLATFORMS if (row := _verify_row(bench, platform)) is not None]
    rows.append(_enrolment_row(bench))
    return rows


def _verify_row(bench: Bench, platform: str) -> Row | None:
    case = PLATFORM_CASES.get(platform)
    if case is None:
        bench.notes.append(f"Attestation: platform {platform} has a verifier but no entry in PLATFORM_CASES.")
        return None
    try:
        sample = case()
    except VectorsMissingError as exc:
        bench.notes.append(f"Attestation: platform {platform} not measured: {exc}.")
        return None
    verifier = verifier_for(platform)

    def verify() -> None:
        verifier.verify(
            sample.evidence, report_data=sample.report_data, now=sample.now, collateral=sample.collateral
        )

    raw: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if sample.raw_qualifying_data:
        # The tpm platform qualifies quotes with SHA-256(report data), and the recorded quote's
        # preimage is unknown: its qualifying data is taken as-is (as the unit tests do), which
        # leaves out one SHA-256 of 64 bytes.
        bench.notes.append(f"Attestation: {platform} evidence is checked with its qualifying data as-is.")
        raw = mock.patch.object(tpm, "qualifying_data", lambda report_data: report_data)
    with raw:
        return _measure_verify(bench, platform, sample, verifier.__class__.__name__, verify)


def _measure_verify(
    bench: Bench, platform: str, sample: Sample, verifier_name: str, verify: Callable[[], None]
) -> Row:
    verify()
    sample.floor()
    per_block = max(1, bench.settings.verify_iterations // _BLOCKS)
    bench.say(f"attestation/{platform}: {bench.settings.verify_iterations} verifications and floors")
    results = alternate(
        _BLOCKS,
        [("floor", lambda: _each(sample.floor, per_block)), ("verify", lambda: _each(verify, per_block))],
    )
    return Row(
        NAME,
        f"{platform}: verify one piece of evidence",
        "µs",
        False,
        sample.floor_text,
        f"{verifier_name}.verify",
        [1e6 * v for v in flatten(results["floor"])],
        [1e6 * v for v in flatten(results["verify"])],
    )


def _each(call: Callable[[], object], times: int) -> list[float]:
    out = []
    for _ in range(times):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def _enrolment_row(bench: Bench) -> Row:
    system = bench.system
    system.add_model(DIGITS_MODEL, "digits")
    deployment = system.deployment("attest", "digits")
    ca_pem = system.ca.read_bytes()
    baseline = bench.baseline("enrol").start()
    server_cert = bench.tls.read("server_cert")
    host = system.custodian.enrolment

    def custos() -> float:
        nonlocal deployment
        for attempt in range(_ATTEMPTS):
            instance = SimInstance(ca_pem, deployment.name, deployment.code)
            start = time.perf_counter()
            try:
                instance.enrol(host, deployment.token)
            except grpc.RpcError as exc:
                if not stale_code(exc) or attempt == _ATTEMPTS - 1:
                    raise
                deployment = system.deployment("attest", "digits")  # the sources changed: a fresh manifest
                continue
            return time.perf_counter() - start
        raise AssertionError("unreachable")

    def plain() -> float:
        instance = SimInstance(ca_pem, deployment.name, deployment.code)
        start = time.perf_counter()
        with grpc.secure_channel(
            baseline.address,
            grpc.ssl_channel_credentials(root_certificates=server_cert),
            options=[("grpc.ssl_target_name_override", SERVER_NAME), ("grpc.use_local_subchannel_pool", 1)],
        ) as channel:
            stub = pb_grpc.EnclaveGatewayStub(channel)
            challenge: pb.Challenge = stub.GetChallenge(pb.ChallengeRequest(deployment=deployment.name))
            stub.Enrol(instance.enrol_request(challenge.nonce, deployment.token), timeout=30)
        return time.perf_counter() - start

    with stopping(baseline):
        custos(), plain()
        n = bench.settings.enrol_round_trips
        bench.say(f"attestation: {n} enrolment round trips against the custodian and the plain server")
        results = alternate(n, [("plain", plain), ("custos", custos)])
    return Row(
        NAME,
        "sim: enrolment round trip (fresh TLS channel, challenge, evidence, CSR, enrol)",
        "ms",
        False,
        "plain gRPC, no checks",
        "custodian",
        [1000 * v for v in results["plain"]],
        [1000 * v for v in results["custos"]],
    )
