"""The collateral cache: atomic files under a directory, in memory, or read-only."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from enclave.collateral.cache import CollateralCache, CollateralCacheError


def test_documents_round_trip_on_disk_with_private_modes(tmp_path: Path) -> None:
    cache = CollateralCache(tmp_path / "intel")
    assert cache.read("tdx-tcb-00806F050000.json") is None
    cache.write("tdx-tcb-00806F050000.json", b"{}")
    cache.write("tdx-tcb-00806F050000.json", b'{"a":1}')
    assert cache.read("tdx-tcb-00806F050000.json") == b'{"a":1}'
    assert stat.S_IMODE((tmp_path / "intel").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "intel" / "tdx-tcb-00806F050000.json").stat().st_mode) == 0o600
    assert [p.name for p in (tmp_path / "intel").iterdir()] == ["tdx-tcb-00806F050000.json"]


def test_memory_cache_keeps_documents_without_a_directory() -> None:
    cache = CollateralCache(None)
    cache.write("rootcacrl.der", b"\x30\x00")
    assert cache.read("rootcacrl.der") == b"\x30\x00"


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "..", "x" * 201, "nul\x00"])
def test_names_that_are_not_plain_file_names_are_refused(tmp_path: Path, name: str) -> None:
    cache = CollateralCache(tmp_path)
    with pytest.raises(CollateralCacheError, match="plain document name"):
        cache.write(name, b"x")
    with pytest.raises(CollateralCacheError, match="plain document name"):
        cache.read(name)


def test_the_longest_name_fits_the_file_system_with_its_temporary_file(tmp_path: Path) -> None:
    cache = CollateralCache(tmp_path)
    name = "amd-vcek-" + "f" * 187 + ".der"  # 200 characters
    cache.write(name, b"x")
    assert cache.read(name) == b"x"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_read_only_directory_is_read_and_never_written(tmp_path: Path) -> None:
    (tmp_path / "rootcacrl.der").write_bytes(b"crl")
    cache = CollateralCache(tmp_path, read_only=True)
    assert cache.read("rootcacrl.der") == b"crl"
    with pytest.raises(CollateralCacheError, match="read-only"):
        cache.write("rootcacrl.der", b"new")
    assert (tmp_path / "rootcacrl.der").read_bytes() == b"crl"


def test_an_oversized_file_reads_as_absent(tmp_path: Path) -> None:
    (tmp_path / "big.json").write_bytes(b"x" * 11)
    cache = CollateralCache(tmp_path, max_bytes=10)
    assert cache.read("big.json") is None
    with pytest.raises(CollateralCacheError, match="over the 10-byte limit"):
        cache.write("other.json", b"x" * 11)
