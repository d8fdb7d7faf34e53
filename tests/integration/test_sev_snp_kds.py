"""`enclave serve --platform sev-snp` replaying a recorded report without certificates, the enclave
fetching its VCEK and chain from a local AMD KDS (real documents from ../shared/vectors).

The recorded report cannot bind the enrolment's nonce, so the custodian must
refuse it; that it refuses on REPORT_DATA proves the chain the enclave
attached verified first (without it the refusal is "lacks its 'vcek' part").
The custodian runs with --amd-kds off: no AMD CRL is recorded for it to check.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.processes import DIGITS_MODEL, Custodian, Enclave, enclave_manifest, isolated_env, running
from tests.unit.collateral.fake_kds import GOSEV_REPORT, GOSEV_VCEK_PATH, FakeKds, serving

pytestmark = pytest.mark.integration


@pytest.fixture
def kds() -> Iterator[FakeKds]:
    with serving(FakeKds.recorded()) as fake:
        yield fake


def test_the_enclave_attaches_kds_certificates_and_the_custodian_verifies_them(
    tmp_path: Path, kds: FakeKds
) -> None:
    env = isolated_env(tmp_path)
    env["CUSTODIAN_AMD_KDS"] = "off"
    custodian = Custodian(tmp_path / "data", env).start()
    enclave = Enclave(tmp_path / "enclave", env)
    with running(custodian, enclave):
        ca = custodian.ca_file()
        custodian.console("model", "add", str(DIGITS_MODEL), "--name", "digits")
        manifest = enclave_manifest(
            tmp_path / "snp.toml",
            ca,
            env,
            platform="sev-snp",
            extra_args=("--register", f"measurement={'00' * 48}"),
        )
        token = custodian.console(
            "deployment", "create", "snp", "--model", "digits", "--manifest", str(manifest)
        )["join_token"]
        entry = tmp_path / "tsm" / "entry0"
        entry.mkdir(parents=True)
        shutil.copy(GOSEV_REPORT, entry / "outblob")  # no auxblob: the host gave no certificate table
        enclave.start(
            custodian,
            ca,
            "snp",
            str(token),
            wait=False,
            platform="sev-snp",
            extra_args=("--tsm-entry", str(entry), "--amd-kds", kds.url),
        )
        assert enclave.proc is not None
        enclave.proc.wait(timeout=120)
        log = enclave.log.read_text()
        assert enclave.proc.returncode == 1, log
        assert "REPORT_DATA does not match" in log
        assert kds.requests[:2] == [GOSEV_VCEK_PATH, "/vcek/v1/Milan/cert_chain"]
        audit = json.dumps(custodian.console("audit", "--last", "20"))
        assert "REPORT_DATA does not match" in audit
