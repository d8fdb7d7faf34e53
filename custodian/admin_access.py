"""Access to the admin API over TCP: client certificates for named administrators.

The admin API listens on the data directory's unix socket, and, when
``--admin-listen`` is given, on a TCP port that requires mutual TLS: the
server presents a certificate from the custodian TLS CA (SAN
``custodian.custos``), the client one from the admin CA (``admin-ca.{key,pem}``
in the data directory), which signs nothing else. ``custodian admin-cert NAME``
asks, over the unix socket only, for such a certificate: the console generates
the key and keeps it, the custodian signs the request with NAME as the CN, and
every action later taken with it is audited with that name as its origin.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from custodian.authority import CertificateAuthority, csr_public_key
from custodian.config import check_name
from custodian.deployments import ADMIN
from custodian.errors import InvalidRequestError
from custodian.ledger import Ledger
from enclave.identity import public_key_der

logger = logging.getLogger(__name__)

MAX_ADMIN_CERT_DAYS = 365
DEFAULT_ADMIN_CERT_DAYS = 30


@dataclass(frozen=True)
class AdminCredentials:
    certificate_pem: bytes
    admin_ca_pem: bytes
    custodian_ca_pem: bytes


class AdminAccess:
    def __init__(self, ledger: Ledger, admin_ca: CertificateAuthority, custodian_ca_pem: bytes) -> None:
        self._ledger = ledger
        self._ca = admin_ca
        self._custodian_ca_pem = custodian_ca_pem

    @property
    def ca_pem(self) -> bytes:
        return self._ca.pem

    async def issue(self, name: str, csr: bytes, *, days: int, origin: str) -> AdminCredentials:
        """A client certificate for the admin TCP listener, CN ``name``, for the key in ``csr``."""
        check_name("administrator", name)
        days = days or DEFAULT_ADMIN_CERT_DAYS
        if not 0 < days <= MAX_ADMIN_CERT_DAYS:
            raise InvalidRequestError(f"validity must be 1 to {MAX_ADMIN_CERT_DAYS} days, got {days}")
        public_key = csr_public_key(csr)
        async with self._ledger.transaction() as tx:
            certificate = self._ca.issue_client(
                public_key, name, now=tx.now, validity=datetime.timedelta(days=days)
            )
            await tx.audit(
                ADMIN,
                "admin.certificate",
                name,
                {
                    "key_sha256": hashlib.sha256(public_key_der(public_key)).hexdigest(),
                    "not_after": certificate.not_valid_after_utc.isoformat(),
                    "origin": origin,
                },
            )
        logger.info("admin certificate issued to %s for %d days", name, days)
        return AdminCredentials(
            certificate.public_bytes(serialization.Encoding.PEM), self._ca.pem, self._custodian_ca_pem
        )
