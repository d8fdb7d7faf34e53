"""Configuration bounds, addresses and names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from custodian.config import Address, CustodianConfig, check_name
from custodian.errors import ConfigError, InvalidRequestError


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:7443", Address("127.0.0.1", 7443)),
        ("0.0.0.0:0", Address("0.0.0.0", 0)),
        ("[::1]:9000", Address("::1", 9000)),
        ("custodian.example:443", Address("custodian.example", 443)),
    ],
    ids=["ipv4", "any-port-0", "ipv6", "hostname"],
)
def test_address_parses(text: str, address: Address) -> None:
    assert Address.parse(text) == address
    assert Address.parse(str(address)) == address


@pytest.mark.parametrize(
    "text", ["7443", ":7443", "host:", "host:port", "host:70000", "host:-1"],
    ids=["no-host", "empty-host", "no-port", "named-port", "port-too-big", "negative-port"],
)  # fmt: skip
def test_address_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        Address.parse(text)


@pytest.mark.parametrize(
    "changes",
    [
        {"nonce_ttl_seconds": 1},
        {"default_offline_grace_seconds": 1},
        {"default_lease_size": 0},
        {"max_model_bytes": 0},
        {"model_chunk_size": 0},
        {"max_message_bytes": 10},
        {"sweep_interval_seconds": 0.0},
        {"client_cert_hours": 0},
        {"listen": Address("127.0.0.1", 65535)},
    ],
    ids=[
        "nonce-ttl",
        "grace",
        "lease-size",
        "model-bytes",
        "chunk",
        "message",
        "sweep",
        "cert-hours",
        "no-port+1",
    ],
)
def test_config_bounds(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        CustodianConfig(data_dir=Path("d"), **changes)


def test_gateway_defaults_to_the_next_port_and_stays_0_for_0() -> None:
    assert CustodianConfig(data_dir=Path("d")).gateway_listen == Address("127.0.0.1", 7444)
    assert CustodianConfig(data_dir=Path("d"), listen=Address("::", 0)).gateway_listen == Address("::", 0)
    explicit = Address("10.0.0.1", 9)
    assert CustodianConfig(data_dir=Path("d"), mtls_listen=explicit).gateway_listen == explicit


def test_requested_values_take_the_default_for_zero_and_are_bounded() -> None:
    config = CustodianConfig(data_dir=Path("d"))
    assert config.offline_grace(0) == config.default_offline_grace_seconds
    assert config.lease_size(0) == config.default_lease_size
    assert config.offline_grace(45) == 45
    with pytest.raises(InvalidRequestError):
        config.offline_grace(1)
    with pytest.raises(InvalidRequestError):
        config.lease_size(10**9)


@pytest.mark.parametrize(
    "name", ["", "-lead", ".hidden", "a b", "a/b", "x" * 65, "é", "demo\n"],
    ids=["empty", "leading-dash", "leading-dot", "space", "slash", "too-long", "non-ascii", "final-newline"],
)  # fmt: skip
def test_names_refused(name: str) -> None:
    with pytest.raises(InvalidRequestError):
        check_name("model", name)


def test_names_accepted() -> None:
    assert check_name("model", "resnet-50_v1.2") == "resnet-50_v1.2"
