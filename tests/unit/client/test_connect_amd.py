"""client.connect(amd_kds=...) and custos-query --amd-kds: used for SEV-SNP only, misuse refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client import connect
from client.cli import main
from client.errors import ClientError
from tests.unit.client.fake_enclave import FakeEnclave
from tests.unit.collateral.fake_kds import FakeKds, serving
from tests.unit.enclave._sim_evidence import reference


@pytest.fixture
def kds() -> Iterator[FakeKds]:
    with serving(FakeKds.recorded()) as fake:
        yield fake


def test_a_kds_is_not_asked_about_evidence_of_another_platform(
    fake: FakeEnclave, address: str, kds: FakeKds
) -> None:
    with connect(address, reference(), amd_kds=kds.url) as connection:
        assert connection.appraisal.platform.platform == "sim"
    assert kds.requests == []


def test_a_kds_url_that_is_not_http_is_a_client_error(address: str) -> None:
    with pytest.raises(ClientError, match="amd_kds: not an http"):
        connect(address, reference(), amd_kds="file:///etc/passwd")


def test_custos_query_refuses_a_bad_kds_url_as_misuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(reference().to_toml())
    with pytest.raises(SystemExit) as exited:
        main(["--enclave", "127.0.0.1:1", "--manifest", str(manifest), "--amd-kds", "ftp://x", "in.png"])
    assert exited.value.code == 2
    assert "--amd-kds" in capsys.readouterr().err
