"""Custodian, enclave and client as real processes over loopback TLS (sim platform)."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client import connect
from client.cli import main as query_main
from client.errors import (
    ClientError,
    EnclaveUnavailableError,
    InvalidInputError,
    QuotaExhaustedError,
    SuspendedError,
)
from enclave.attestation import ReferenceValues
from testkit.processes import DIGITS_MODEL, DIGITS_SAMPLES, enclave_manifest, poll

from ._loopback import Loopback

pytestmark = pytest.mark.integration
_names = (f"d{i}" for i in itertools.count())


class System(Loopback):
    """One custodian with the demo model; deployments and enclaves made per test."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.enclave_manifest = enclave_manifest(tmp / "enclave.toml", self.ca, self.env)

    def deployment(self, *, grant: int = 0, grace: int = 30, manifest: Path | None = None) -> tuple[str, str]:
        name = next(_names)
        created = self.custodian.console(
            "deployment",
            "create",
            name,
            "--model",
            "digits",
            "--manifest",
            str(manifest or self.enclave_manifest),
            "--offline-grace",
            str(grace),
        )
        if grant:
            self.custodian.console("grant", name, str(grant))
        return name, created["join_token"]


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with System(tmp_path_factory.mktemp("e2e")) as system:
        yield system


def _image(name: str) -> bytes:
    return (DIGITS_SAMPLES / name).read_bytes()


def test_quota_is_exact_under_concurrency(system: System) -> None:
    granted = 8
    name, token = system.deployment(grant=granted)
    enclave = system.enclave(name, token)
    image = _image("digit-3.png")
    with connect(enclave.address, system.end_user_manifest(name)) as conn:

        def one(_: int) -> str:
            try:
                conn.infer_image(image)
            except QuotaExhaustedError:
                return "exhausted"
            return "served"

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(one, range(5 * granted)))
    assert outcomes.count("served") == granted
    assert outcomes.count("exhausted") == 4 * granted
    usage = poll(lambda: (u := system.custodian.usage(name))["used"] == granted and u)
    assert usage["balance"] == 0
    used_gauge = "custos_custodian_deployment_used"
    poll(lambda: system.custodian.metric(used_gauge, deployment=name) == granted)
    assert enclave.metric("custos_enclave_inferences_total", outcome="served") == granted


def test_rejected_input_costs_no_quota(system: System) -> None:
    name, token = system.deployment(grant=5)
    enclave = system.enclave(name, token)
    png = _image("digit-1.png")
    bad_inputs = {
        "not-an-image": _image("not-an-image.txt"),
        "truncated-png": png[: len(png) // 2],
        "corrupt-png": png[:40] + bytes(len(png) - 40),
    }
    with connect(enclave.address, system.end_user_manifest(name)) as conn:
        for label, data in bad_inputs.items():
            with pytest.raises(InvalidInputError, match="INVALID_ARGUMENT"):
                conn.infer_image(data)
            assert enclave.metric("custos_enclave_lease_used") == 0, label
        with pytest.raises(InvalidInputError, match="INVALID_ARGUMENT"):
            conn.infer_tensor(np.zeros((1, 1, 9, 9), dtype=np.float32))
        assert enclave.metric("custos_enclave_inferences_total", outcome="served") == 0
        assert conn.infer_image(png).top[0].label == "one"
        assert enclave.metric("custos_enclave_lease_used") == 1
    assert poll(lambda: system.custodian.usage(name)["used"] == 1)


def _tampered(path: Path, tmp: Path, label: str, **changes: object) -> Path:
    ref = replace(ReferenceValues.from_toml(path.read_text()), **changes)  # type: ignore[arg-type]
    out = tmp / f"tampered-{label}.toml"
    out.write_text(ref.to_toml())
    return out


# (label, manifest changes, the reason custos-query must name)
TAMPERINGS = [
    ("code-measurement", {"code_sha384": "00" * 48}, "code measurement is"),
    ("custodian-ca", {"custodian_ca_sha256": "11" * 32}, "pins custodian CA"),
    (
        "simulated-for-a-tpm-manifest",
        {
            "platform": "tpm",
            "allow_simulation": False,
            "registers": {f"pcr.sha256.{i}": "00" * 32 for i in range(10)},
        },
        "manifest expects 'tpm'",
    ),
    ("other-model", {"allowed_model_sha384": ("22" * 48,)}, "not among the manifest's allowed models"),
    ("boot-register", {"registers": {"sim.boot": "33" * 48}}, "register sim.boot is"),
]


def test_query_refused_on_manifest_mismatch_sends_nothing(
    system: System, capsys: pytest.CaptureFixture[str]
) -> None:
    name, token = system.deployment(grant=5)
    enclave = system.enclave(name, token)
    good = system.end_user_manifest(name)
    image = str(DIGITS_SAMPLES / "digit-2.png")
    for label, changes, reason in TAMPERINGS:
        manifest = _tampered(good, system.tmp, label, **changes)
        code = query_main(["--enclave", enclave.address, "--manifest", str(manifest), image])
        assert code == 3, label
        assert reason in capsys.readouterr().err, label
    assert enclave.metric("custos_enclave_inferences_total") == 0
    assert query_main(["--enclave", enclave.address, "--manifest", str(good), image]) == 0
    assert enclave.metric("custos_enclave_inferences_total") == 1


def test_query_cli_exit_codes_for_quota_and_suspension(system: System) -> None:
    name, token = system.deployment(grant=1)
    enclave = system.enclave(name, token)
    manifest = str(system.end_user_manifest(name))
    image = str(DIGITS_SAMPLES / "digit-4.png")
    argv = ["--enclave", enclave.address, "--manifest", manifest, "--json", image]
    assert query_main(argv) == 0
    assert query_main(argv) == 4
    system.custodian.console("grant", name, "1")
    system.custodian.console("suspend", name)
    time.sleep(1.0)  # suspension must have reached the enclave within one second
    assert query_main(argv) == 5
    system.custodian.console("resume", name)
    assert poll(lambda: query_main(argv) == 0)


def test_query_cli_says_what_happened_to_an_enclave_zeroized_by_a_suspension(
    system: System, capsys: pytest.CaptureFixture[str]
) -> None:
    """Suspended past its grace, the enclave zeroizes and closes its port until it has enrolled again."""
    name, token = system.deployment(grant=5, grace=3)
    enclave = system.enclave(name, token)
    image = str(DIGITS_SAMPLES / "digit-4.png")
    argv = ["--enclave", enclave.address, "--manifest", str(system.end_user_manifest(name)), image]
    assert query_main(argv) == 0
    assert f"  deployment  {name}\n" in capsys.readouterr().out
    system.custodian.console("suspend", name)
    poll(lambda: enclave.metric("custos_enclave_zeroizations_total", reason="suspended") == 1, deadline=60)
    assert query_main(argv) == 1
    (line,) = capsys.readouterr().err.splitlines()
    # Refused between its attempts to enrol again; reset or unanswered while an attempt holds the port.
    assert line.startswith(
        (
            f"custos-query: nothing is listening at {enclave.address} (connection refused)",
            f"custos-query: the enclave at {enclave.address} closed the connection before its TLS",
            f"custos-query: the enclave at {enclave.address} did not answer before its TLS",
        )
    ), line
    assert "zeroized its model and keys after a suspension" in line
    system.custodian.console("resume", name)
    assert poll(lambda: query_main(argv) == 0, deadline=90, interval=0.5)


def test_suspend_reaches_a_connected_enclave_within_one_second(system: System) -> None:
    name, token = system.deployment(grant=10)
    enclave = system.enclave(name, token)
    with connect(enclave.address, system.end_user_manifest(name)) as conn:
        conn.infer_image(_image("digit-6.png"))
        system.custodian.console("suspend", name)
        time.sleep(1.0)
        assert conn.status().suspended
        with pytest.raises(SuspendedError, match="suspended"):
            conn.infer_image(_image("digit-6.png"))
        system.custodian.console("resume", name)
        poll(lambda: not conn.status().suspended)
        conn.infer_image(_image("digit-6.png"))
    assert poll(lambda: system.custodian.usage(name)["used"] == 2)


def test_enrolment_refusals_name_the_reason(system: System) -> None:
    name, _ = system.deployment(grant=1)
    err = system.refused(system.enclave(name, "not-the-token", wait=False))
    assert "join token is not valid" in err
    bad_manifest = _tampered(system.enclave_manifest, system.tmp, "enrol-code", code_sha384="44" * 48)
    other, token = system.deployment(grant=1, manifest=bad_manifest)
    err = system.refused(system.enclave(other, token, wait=False))
    assert "code measurement" in err
    wrong_ca = system.tmp / "wrong-ca.pem"
    wrong_ca.write_text(_other_ca_pem())
    third, token = system.deployment(grant=1)
    err = system.refused(system.enclave(third, token, wait=False, ca=wrong_ca))
    assert "does not chain to --custodian-ca" in err  # the enclave pins another CA: said at once
    enclaves = system.custodian.console("enclaves")
    rows = enclaves["enclaves"] if isinstance(enclaves, dict) else enclaves
    assert not [row for row in rows if row["deployment"] in {name, other, third}]


def _other_ca_pem() -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Impostor CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_sigterm_reports_final_usage_and_returns_the_rest(system: System) -> None:
    name, token = system.deployment(grant=6)
    enclave = system.enclave(name, token)
    with connect(enclave.address, system.end_user_manifest(name)) as conn:
        for _ in range(2):
            conn.infer_image(_image("digit-8.png"))
    assert enclave.stop(signal.SIGTERM) == 0
    usage = poll(lambda: (u := system.custodian.usage(name))["used"] == 2 and u)
    assert usage["leased"] == 0
    assert usage["balance"] == 4


def test_offline_grace_restart_and_durable_ledger(tmp_path: Path) -> None:
    with System(tmp_path) as system:
        name, token = system.deployment(grant=20, grace=3)
        enclave = system.enclave(name, token)
        manifest = system.end_user_manifest(name)
        served = 0
        with connect(enclave.address, manifest) as conn:
            conn.infer_image(_image("digit-5.png"))
            served += 1
            poll(lambda: system.custodian.usage(name)["used"] == 1)
            system.custodian.stop(signal.SIGKILL)

            def refused_offline() -> bool:
                nonlocal served
                try:
                    conn.infer_image(_image("digit-5.png"))
                except EnclaveUnavailableError:
                    return True
                served += 1
                return False

            poll(refused_offline, deadline=30, interval=0.25)
            assert not conn.status().custodian_reachable
            system.custodian.start()

            def serves_again() -> bool:
                nonlocal served
                try:
                    conn.infer_image(_image("digit-5.png"))
                except ClientError:
                    return False
                served += 1
                return True

            poll(serves_again, deadline=30, interval=0.25)
        usage = poll(lambda: (u := system.custodian.usage(name))["used"] == served and u)
        assert usage["granted_total"] == 20
        assert usage["balance"] + usage["leased"] + usage["used"] == 20
    _assert_no_plaintext(DIGITS_MODEL.read_bytes(), [tmp_path])


def _assert_no_plaintext(model: bytes, roots: list[Path]) -> None:
    probes = [model[i : i + 48] for i in range(0, len(model) - 48, max(1, len(model) // 16))]
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.suffix != ".sock":
                content = path.read_bytes()
                assert not any(p in content for p in probes), f"plaintext model bytes in {path}"


def test_no_plaintext_model_in_data_or_temp_dirs(system: System) -> None:
    name, token = system.deployment(grant=2)
    enclave = system.enclave(name, token)
    with connect(enclave.address, system.end_user_manifest(name)) as conn:
        conn.infer_image(_image("digit-0.png"))
    # The custodian's data dir, both processes' TMPDIR and the enclave's working dirs.
    roots = [system.custodian.data, Path(system.env["TMPDIR"]), *(e.workdir for e in system.enclaves)]
    _assert_no_plaintext(DIGITS_MODEL.read_bytes(), roots)
