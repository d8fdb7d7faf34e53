"""The custodian server's configuration: one frozen dataclass with explicit bounds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from custodian.errors import ConfigError, CustodianError, InvalidRequestError
from enclave.collateral._http import check_base_url
from enclave.collateral.intel_pcs import INTEL_PCS_URL
from enclave.envelope import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE

# Bounds every configuration must respect, whatever the flags say.
NONCE_TTL_BOUNDS = (5, 600)
GRACE_BOUNDS = (3, 86_400)
# Seconds without a renewed lease before an enclave zeroizes: at least the grace, at most 30 days.
MAX_ZEROIZE_AFTER = 30 * 86_400
# Default zeroize-after, as a multiple of the deployment's offline grace.
ZEROIZE_GRACES = 4
LEASE_SIZE_BOUNDS = (1, 1_000_000)
MAX_MODEL_BYTES = 8 << 30
MESSAGE_BYTES_BOUNDS = (64 << 10, 64 << 20)
# Largest single grant or revoke; keeps every balance far inside SQLite's signed 64-bit integers.
MAX_GRANT_UNITS = 10**12


def is_postgres_url(database: str | Path) -> bool:
    """Whether ``database`` names a PostgreSQL database rather than an SQLite file."""
    return isinstance(database, str) and database.startswith(("postgresql://", "postgres://"))


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"address {text!r} is not HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(host, int(port))


@dataclass(frozen=True)
class CustodianConfig:
    data_dir: Path
    # Enrolment listener (TLS). The gateway (mutual TLS) defaults to the same host, PORT+1 (0 when PORT is 0).
    listen: Address = Address("127.0.0.1", 7443)
    mtls_listen: Address | None = None
    # Prometheus text over HTTP; None turns the endpoint off.
    metrics_listen: Address | None = None
    # Admin API over TCP, mutual TLS with certificates from `custodian admin-cert`; None: socket only.
    admin_listen: Address | None = None
    # The web console (HTTP, custodian.web); None: off.
    console_listen: Address | None = None
    nonce_ttl_seconds: int = 60
    client_cert_hours: int = 24
    default_offline_grace_seconds: int = 30
    default_lease_size: int = 100
    max_model_bytes: int = 2 << 30
    model_chunk_size: int = DEFAULT_CHUNK_SIZE
    # Largest message the gateway accepts (evidence, claims and CSR together).
    max_message_bytes: int = 1 << 20
    sweep_interval_seconds: float = 1.0
    # Intel collateral for tdx and sgx evidence: from this PCS or PCCS (None: fetch nothing), cached in
    # DATA/collateral/intel; or, on an air-gapped site, read as it is from collateral_dir.
    pccs_url: str | None = INTEL_PCS_URL
    collateral_dir: Path | None = None
    # AMD KDS for SEV-SNP collateral (VCEK, chain, CRL), cached under DATA/collateral/amd; None: off.
    amd_kds: str | None = None
    # A postgresql:// URL: the ledger, the shared keys and the sealed models of several replicas
    # (custodian.replica); None: SQLite and files in the data directory.
    database: str | None = None
    # The master key that wraps the replicas' shared keys; None: DATA/master.key.
    master_key: Path | None = None

    def __post_init__(self) -> None:
        _within("nonce_ttl_seconds", self.nonce_ttl_seconds, *NONCE_TTL_BOUNDS)
        _within("client_cert_hours", self.client_cert_hours, 1, 24 * 30)
        _within("default_offline_grace_seconds", self.default_offline_grace_seconds, *GRACE_BOUNDS)
        _within("default_lease_size", self.default_lease_size, *LEASE_SIZE_BOUNDS)
        _within("max_model_bytes", self.max_model_bytes, 1, MAX_MODEL_BYTES)
        _within("model_chunk_size", self.model_chunk_size, 1, MAX_CHUNK_SIZE)
        _within("max_message_bytes", self.max_message_bytes, *MESSAGE_BYTES_BOUNDS)
        if self.amd_kds is not None:
            try:
                check_base_url(self.amd_kds)
            except ValueError as exc:
                raise ConfigError(f"amd_kds: {exc}") from None
        if self.database is not None and not is_postgres_url(self.database):
            raise ConfigError("database must be a postgresql:// URL")
        if self.master_key is not None and self.database is None:
            raise ConfigError("a master key is for replicas on PostgreSQL: give --database too")
        if not 0.05 <= self.sweep_interval_seconds <= 60:
            raise ConfigError("sweep_interval_seconds must be between 0.05 and 60")
        if self.mtls_listen is None and self.listen.port == 65535:
            raise ConfigError(
                "the gateway defaults to PORT+1; give --mtls-listen when --listen uses port 65535"
            )

    @property
    def gateway_listen(self) -> Address:
        if self.mtls_listen is not None:
            return self.mtls_listen
        return Address(self.listen.host, self.listen.port + 1 if self.listen.port else 0)

    @property
    def master_key_path(self) -> Path:
        return self.master_key if self.master_key is not None else self.data_dir / "master.key"

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "admin.sock"

    def offline_grace(self, requested: int) -> int:
        """The grace a deployment gets: the default for 0, else ``requested`` within bounds."""
        if requested == 0:
            return self.default_offline_grace_seconds
        return _within("offline grace", requested, *GRACE_BOUNDS, error=InvalidRequestError)

    def zeroize_after(self, requested: int, grace: int) -> int:
        """When an enclave drops the model without a renewed lease: ``ZEROIZE_GRACES`` graces for 0."""
        if requested == 0:
            return min(MAX_ZEROIZE_AFTER, ZEROIZE_GRACES * grace)
        return _within("zeroize-after", requested, grace, MAX_ZEROIZE_AFTER, error=InvalidRequestError)

    def lease_size(self, requested: int) -> int:
        if requested == 0:
            return self.default_lease_size
        return _within("lease size", requested, *LEASE_SIZE_BOUNDS, error=InvalidRequestError)


def _within(what: str, value: int, low: int, high: int, *, error: type[CustodianError] = ConfigError) -> int:
    if not low <= value <= high:
        raise error(f"{what} must be between {low} and {high}, got {value}")
    return value


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(kind: str, name: str) -> str:
    """Model and deployment names: 1-64 of letters, digits, ``.``, ``_``, ``-``, starting alphanumeric."""
    if not _NAME.fullmatch(name):  # fullmatch: "$" would let a final newline through
        raise InvalidRequestError(
            f"{kind} name {name!r} must be 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return name
