"""Reaching an enclave: its address, the unverified handshake that reads its certificate, and,
when a pinned channel cannot reach it, why.
"""

from __future__ import annotations

import socket
import ssl

from client.errors import (
    ClientError,
    EnclaveChangedError,
    EnclaveNotListeningError,
    EnclaveUnavailableError,
    VerificationRefusedError,
)
from enclave import identity

_ZEROIZED = "zeroized its model and keys after a suspension or a long custodian outage"


def fetch_certificate(address: str, *, timeout: float) -> bytes:
    """The enclave's TLS certificate (PEM), read from a handshake without verifying it.

    Only a TLS ClientHello is sent. The size of what the server may send is
    bounded by OpenSSL's certificate-list limit, then by ``read_attested_certificate``.
    """
    host, port = split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the certificate is appraised, then pinned
    context.set_alpn_protocols(["h2"])
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError as exc:
        raise EnclaveNotListeningError(
            f"nothing is listening at {address} (connection refused): the enclave is stopped, or it "
            f"{_ZEROIZED}; try again once it has enrolled again"
        ) from exc
    except OSError as exc:
        raise EnclaveUnavailableError(f"cannot reach enclave at {address}: {exc}") from exc
    try:
        with raw, context.wrap_socket(raw, server_hostname=identity.ENCLAVE_TLS_NAME) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLError as exc:
        raise EnclaveUnavailableError(f"TLS handshake with the enclave at {address} failed: {exc}") from exc
    except (ConnectionResetError, TimeoutError) as exc:
        what = "closed the connection" if isinstance(exc, ConnectionResetError) else "did not answer"
        raise EnclaveNotListeningError(
            f"the enclave at {address} {what} before its TLS handshake: it is starting or stopping, "
            f"or it {_ZEROIZED} and is enrolling again; try again once it has enrolled again"
        ) from exc
    except OSError as exc:
        raise EnclaveUnavailableError(f"cannot reach enclave at {address}: {exc}") from exc
    if not der:
        raise VerificationRefusedError("enclave presented no certificate")
    return ssl.DER_cert_to_PEM_cert(der).encode()


def why_unavailable(address: str, pinned_pem: bytes, *, timeout: float) -> EnclaveUnavailableError | None:
    """Why a channel pinned to ``pinned_pem`` was answered UNAVAILABLE, learnt from a new handshake.

    The enclave gone, or another certificate at its address (gRPC reports both
    as UNAVAILABLE, in its own words); ``None`` when the same enclave still
    answers, so the UNAVAILABLE was its own (no custodian past the grace).
    """
    try:
        presented = fetch_certificate(address, timeout=timeout)
    except EnclaveUnavailableError as exc:
        return exc
    except VerificationRefusedError:
        presented = b""
    if presented == pinned_pem:
        return None
    return EnclaveChangedError(
        f"the enclave at {address} now presents another certificate than the one verified: it "
        "enrolled again (after a restart or a zeroization), or something else answers at its "
        "address; nothing was sent; connect again to verify it"
    )


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address needs brackets: [::1]:8443
    if not sep or not host:
        raise ClientError(f"enclave address {address!r} is not HOST:PORT")
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientError(f"enclave address {address!r} has no valid port")
    return host, int(port)


def grpc_target(address: str) -> str:
    host, port = split_address(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
