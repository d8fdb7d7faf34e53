"""What custodian replicas on one PostgreSQL database share: the keys, wrapped by one master key.

A single custodian keeps its CA keys and key-encryption key in its data
directory. Replicas must all hold the same ones (any replica serves any
enclave: each pins the TLS CA, holds a certificate of the enclave CA, and is
sent models whose data keys the KEK wraps), and the database must never hold
them in clear. So the database holds them wrapped (AES-256-GCM, the key's name
as associated data) by a 256-bit **master key** that lives only in files:

- the first replica to start on an empty database creates the keys, writes the
  master key to ``DATA/master.key`` (0600) and stores the wrapped keys, in one
  transaction (the audit chain's head lock keeps a second replica starting at
  the same moment from making another set);
- every other replica needs a copy of that one file, in its own data directory
  or where ``--master-key FILE`` says. Without it, or with another one, it
  refuses to start and says which file it needs.

``custodian replica init`` runs ``check`` to say what a new replica lacks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from custodian import data_dir
from custodian._ledger_postgres import PostgresTransaction
from custodian.authority import CertificateAuthority
from custodian.errors import ConfigError, CustodianError, LedgerError
from custodian.ledger import Ledger, Transaction
from enclave.envelope import KEY_SIZE

logger = logging.getLogger(__name__)

MASTER_KEY_FILE = "master.key"
# The certificate authorities every replica shares: name, common name of a new one.
AUTHORITIES = (
    ("custodian-ca", "Custos custodian CA"),
    ("enclave-ca", "Custos enclave CA"),
    ("ak-ca", "Custos TPM AK CA"),
    ("admin-ca", "Custos admin CA"),
)
KEK = "kek"
_NONCE_SIZE = 12


@dataclass(frozen=True)
class SharedKeys:
    tls_ca: CertificateAuthority
    enclave_ca: CertificateAuthority
    ak_ca: CertificateAuthority
    admin_ca: CertificateAuthority
    kek: bytes


def missing_master_key(path: Path) -> str:
    return (
        f"no master key at {path}: this database's keys are wrapped by the master key that its first"
        " replica wrote to DATA/master.key; copy that file here (mode 0600, owned by the custodian's"
        " user) or name it with --master-key FILE"
    )


def wrong_master_key(path: Path) -> str:
    return (
        f"{path} is not this database's master key: it does not open the shared keys;"
        " copy DATA/master.key from the replica that started first on this database"
    )


async def shared_keys(ledger: Ledger, master_key: Path, *, now: datetime) -> SharedKeys:
    """The replicas' keys from the database, created with the master key if the database has none."""
    async with ledger.transaction() as tx:
        stored = await _postgres(tx).shared_keys()
        if stored:
            return _unwrap(stored, read_master_key(master_key), master_key)
        return await _create(_postgres(tx), master_key, now)


def read_master_key(path: Path) -> bytes:
    """The master key file's 32 bytes (a private file: 0600, owned by us, not a link)."""
    if not os.path.lexists(path):
        raise ConfigError(missing_master_key(path))
    key = data_dir.read_private(path)
    if len(key) != KEY_SIZE:
        raise ConfigError(f"{path} is not a master key: {len(key)} bytes, not {KEY_SIZE}")
    return key


async def check(data: Path, database: str, master_key: Path) -> tuple[list[str], str]:
    """What a replica with this data directory, database and master key lacks, and what it would do.

    Returns (problems, state); no problems means the replica can start.
    """
    try:
        data_dir.prepare(data)
    except (ConfigError, OSError) as exc:
        return [f"data directory: {exc}"], ""
    try:
        ledger = await Ledger.open(database)
    except LedgerError as exc:
        return [f"database: {exc}"], ""
    try:
        async with ledger.transaction() as tx:
            stored = await _postgres(tx).shared_keys()
    except CustodianError as exc:
        return [f"database: {exc}"], ""
    finally:
        await ledger.close()
    if not stored:
        return [], _first_replica(master_key)
    try:
        _unwrap(stored, read_master_key(master_key), master_key)
    except ConfigError as exc:
        return [str(exc)], ""
    return [], f"{master_key} opens the database's shared keys: this replica can serve"


def _first_replica(master_key: Path) -> str:
    if os.path.lexists(master_key):
        return f"the database has no keys yet: this replica will create them, wrapped by {master_key}"
    return f"the database has no keys yet: this replica will create them and write {master_key}"


def _postgres(tx: Transaction) -> PostgresTransaction:
    if not isinstance(tx, PostgresTransaction):
        raise ConfigError(
            "shared keys need a PostgreSQL ledger (custodian serve --database postgresql://...)"
        )
    return tx


async def _create(tx: PostgresTransaction, master_key: Path, now: datetime) -> SharedKeys:
    master = _master_key_for_new_keys(master_key)
    authorities = [CertificateAuthority.create(common, now=now) for _, common in AUTHORITIES]
    kek = os.urandom(KEY_SIZE)
    for (name, _), ca in zip(AUTHORITIES, authorities, strict=True):
        await tx.add_shared_key(name, _wrap(master, name, ca.key_pem), ca.pem)
    await tx.add_shared_key(KEK, _wrap(master, KEK, kek), b"")
    await tx.audit(
        "custodian",
        "replica.keys.create",
        "",
        {"custodian_ca_sha256": authorities[0].sha256, "keys": len(authorities) + 1},
    )
    tls_ca, enclave_ca, ak_ca, admin_ca = authorities
    return SharedKeys(tls_ca, enclave_ca, ak_ca, admin_ca, kek)


def _unwrap(stored: dict[str, tuple[bytes, bytes]], master: bytes, path: Path) -> SharedKeys:
    missing = [name for name in (*(n for n, _ in AUTHORITIES), KEK) if name not in stored]
    if missing:
        raise ConfigError(f"the database's shared keys are incomplete: {', '.join(missing)} missing")
    try:
        opened = {name: _open(master, name, wrapped) for name, (wrapped, _) in stored.items()}
    except InvalidTag:
        raise ConfigError(wrong_master_key(path)) from None
    authorities = [
        CertificateAuthority.from_pem(opened[name], stored[name][1], f"the shared {name}")
        for name, _ in AUTHORITIES
    ]
    if len(opened[KEK]) != KEY_SIZE:
        raise ConfigError(f"the shared key-encryption key is not {KEY_SIZE} bytes")
    tls_ca, enclave_ca, ak_ca, admin_ca = authorities
    return SharedKeys(tls_ca, enclave_ca, ak_ca, admin_ca, opened[KEK])


def _master_key_for_new_keys(path: Path) -> bytes:
    """The master key at ``path`` if there is one, else a new one written there."""
    if os.path.lexists(path):
        return read_master_key(path)
    master = AESGCM.generate_key(bit_length=256)
    data_dir.write_private(path, master)
    logger.info("created the master key %s: copy it to every other replica's data directory", path)
    return master


def _aad(name: str) -> bytes:
    return b"custos shared key\x00" + name.encode()


def _wrap(master: bytes, name: str, secret: bytes) -> bytes:
    nonce = os.urandom(_NONCE_SIZE)
    return nonce + AESGCM(master).encrypt(nonce, secret, _aad(name))


def _open(master: bytes, name: str, wrapped: bytes) -> bytes:
    if len(wrapped) <= _NONCE_SIZE:
        raise InvalidTag
    return AESGCM(master).decrypt(wrapped[:_NONCE_SIZE], wrapped[_NONCE_SIZE:], _aad(name))
