"""Tell a custodian that cannot be trusted from one that cannot be reached.

gRPC reports a TLS handshake that failed certificate verification as
``UNAVAILABLE``, like a custodian that is not up yet, with the reason only in
free text. A wrong ``--custodian-ca`` must not be retried for the whole
connect timeout and then reported as "not reachable": after an
``UNAVAILABLE``, one plain TLS handshake with the same pinned CA and server
name says which it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from enclave._daemon.config import DaemonConfig, parse_address
from enclave._daemon.errors import CustodianCertificateError


async def check_custodian_certificate(config: DaemonConfig, server_name: str, address: str) -> None:
    """Raise ``CustodianCertificateError`` when the custodian at ``address`` answers with a certificate
    the pinned CA does not vouch for; return quietly when it verifies or cannot be reached at all."""
    host, port = parse_address(address, what="--custodian")
    context = ssl.create_default_context(cadata=config.custodian_ca_pem.decode("ascii", errors="replace"))
    try:
        async with asyncio.timeout(config.call_timeout):
            _, writer = await asyncio.open_connection(
                host.strip("[]"), port, ssl=context, server_hostname=server_name
            )
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or exc.reason or "verification failed"
        raise CustodianCertificateError(
            f"the custodian's certificate at {address} does not chain to --custodian-ca ({reason})"
        ) from None
    except (OSError, TimeoutError):
        return  # not reachable (or not speaking TLS): the caller's retry decides
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
