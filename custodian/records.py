"""The ledger's records: whole rows as frozen dataclasses, shared by the ledger and the services."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from custodian.quota import Account, Allotment
from enclave.receipts import TokenCounts

LEASE_STATES = ("active", "closed", "expired")
MODEL_KINDS = ("classifier", "language")
_NO_TOKENS = TokenCounts()


@dataclass(frozen=True)
class ModelRecord:
    model_id: bytes
    name: str
    sha384: bytes
    size: int
    chunk_size: int
    chunk_count: int
    # The data key, wrapped by the custodian's key-encryption key.
    wrapped_key: bytes
    created_at: datetime
    # The model's inputs as its load check found them (``custodian.model_check``, JSON).
    inputs: str = ""
    # One of MODEL_KINDS: a classifier's unit is a call, a language model's a token.
    kind: str = "classifier"


@dataclass(frozen=True)
class DeploymentRecord:
    name: str
    model_id: bytes
    manifest: str
    token_sha256: bytes
    offline_grace_seconds: int
    lease_size: int
    suspended: bool
    account: Account
    created_at: datetime
    zeroize_after_seconds: int = 0


@dataclass(frozen=True)
class InstanceRecord:
    instance_id: str
    deployment: str
    platform: str
    public_key: bytes  # SubjectPublicKeyInfo, DER
    enrolled_at: datetime
    last_seen: datetime
    # Sequence number of the last receipt accepted from this instance (0: none yet).
    last_seq: int

    @property
    def key_sha256(self) -> str:
        return hashlib.sha256(self.public_key).hexdigest()


@dataclass(frozen=True)
class LeaseRecord:
    lease_id: str
    instance_id: str
    deployment: str
    units: Allotment
    state: str
    expires_at: datetime
    # A language model's: of ``units.used``, the prompt and completion tokens its receipts prove.
    tokens: TokenCounts = _NO_TOKENS

    @property
    def active(self) -> bool:
        return self.state == "active"


@dataclass(frozen=True)
class ReceiptRecord:
    """A usage receipt as accepted: its signed body, its signature and the body's SHA-256."""

    instance_id: str
    seq: int
    lease_id: str
    used: int
    body: bytes
    signature: bytes
    digest: bytes
    received_at: datetime
