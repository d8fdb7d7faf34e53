"""The data directory: owned by the custodian's user, every file 0600, a planted key refused."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from custodian.config import Address, CustodianConfig
from custodian.errors import ConfigError
from custodian.server import CustodianServer
from tests.integration.custodian.harness import running

pytestmark = pytest.mark.integration

_ROOT = os.geteuid() == 0
_NOBODY = 65534


def _start(data: Path, owner_uid: int | None = None) -> None:
    async def scenario() -> None:
        config = CustodianConfig(data_dir=data, listen=Address("127.0.0.1", 0))
        server = await CustodianServer.start(config, owner_uid=owner_uid)
        await server.stop(grace=0)

    asyncio.run(scenario())


def test_every_file_is_0600_and_every_directory_0700(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            await r.lend("d", units=5)
            data = tmp_path / "data"
            files = [p for p in data.rglob("*") if not p.is_socket()]
            assert {p.name for p in files} >= {
                "custodian-ca.pem",
                "custodian-ca.key",
                "kek",
                "ledger.sqlite3",
                "ledger.sqlite3-wal",
                "endpoints.json",
                "custodian.lock",
            }
            assert any(p.suffix == ".sealed" for p in files)
            for path in [data, *files]:
                expected = 0o700 if path.is_dir() else 0o600
                assert stat.S_IMODE(path.stat().st_mode) == expected, path

    asyncio.run(scenario())


def test_a_data_directory_someone_else_made_is_refused(tmp_path: Path) -> None:
    """Another user pre-creates the directory (0700), models/ and an all-zero kek."""
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True, mode=0o700)
    data.chmod(0o700)
    (data / "kek").write_bytes(bytes(32))
    (data / "kek").chmod(0o600)
    owner_uid = None
    if _ROOT:
        for path in (data, data / "models", data / "kek"):
            os.chown(path, _NOBODY, _NOBODY)
    else:  # cannot give files away: expect another owner instead, the same check
        owner_uid = os.geteuid() + 1
    with pytest.raises(ConfigError, match=f"{data} belongs to uid"):
        _start(data, owner_uid)
    assert sorted(p.name for p in data.iterdir()) == ["kek", "models"]


def _symlinked_kek(data: Path) -> None:
    elsewhere = data.parent / "zero-kek"
    elsewhere.write_bytes(bytes(32))
    elsewhere.chmod(0o600)
    (data / "kek").symlink_to(elsewhere)


def _loose(name: str, mode: int) -> Callable[[Path], None]:
    def make(data: Path) -> None:
        (data / name).write_bytes(bytes(32))
        (data / name).chmod(mode)

    return make


def _models(data: Path) -> None:
    (data / "models").chmod(0o777)


def _models_link(data: Path) -> None:
    (data.parent / "theirs").mkdir(mode=0o700)
    (data / "models").rmdir()
    (data / "models").symlink_to(data.parent / "theirs")


@pytest.mark.parametrize(
    ("plant", "reason"),
    [
        (_symlinked_kek, "kek is a symbolic link"),
        (_loose("kek", 0o666), "kek is mode 0666, writable by other users"),
        (_loose("kek", 0o644), "kek is mode 0644; a key file must be 0600"),
        (_loose("custodian-ca.key", 0o640), "custodian-ca.key is mode 0640; a key file must be 0600"),
        (_loose("ledger.sqlite3", 0o664), "ledger.sqlite3 is mode 0664, writable by other users"),
        (_models, "models is mode 0777, open to other users"),
        (_models_link, "models is a symbolic link"),
        (lambda data: data.chmod(0o755), "is mode 0755, open to other users"),
    ],
    ids=["kek-symlink", "kek-world-writable", "kek-world-readable", "ca-key-group-readable",
         "ledger-group-writable", "models-open", "models-symlink", "data-dir-open"],
)  # fmt: skip
def test_a_planted_or_loose_file_is_refused_by_name(
    tmp_path: Path, plant: Callable[[Path], None], reason: str
) -> None:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True, mode=0o700)
    data.chmod(0o700)
    plant(data)
    with pytest.raises(ConfigError, match=reason):
        _start(data)


def test_certificates_and_ledger_an_older_version_left_0644_are_tightened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _start(data)
    for name in ("custodian-ca.pem", "ledger.sqlite3"):
        (data / name).chmod(0o644)
    _start(data)
    for name in ("custodian-ca.pem", "ledger.sqlite3"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600


def test_the_collateral_cache_survives_a_restart_and_must_be_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _start(data)
    assert (data / "collateral" / "intel").is_dir()
    (data / "collateral" / "intel" / "tdx-qe-identity.json").write_bytes(b"{}")
    _start(data)  # the cache directory the first start made is the custodian's own
    (data / "collateral").chmod(0o777)
    with pytest.raises(ConfigError, match=r"collateral is mode 0777, open to other users"):
        _start(data)
