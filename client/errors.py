"""Errors of the client: one base class; the CLI maps each to an exit code.

Every error of the client API is a ``ClientError``. Errors that come from the
enclave keep its status code and reason in the message; a verification refusal
keeps the attestation error that caused it (``__cause__``), whose
``diagnostics()`` lists every mismatch.
"""

from __future__ import annotations

from enclave.errors import EnclaveError


class ClientError(Exception):
    """Base of every error the client raises."""

    exit_code = 1

    def diagnostics(self) -> str:
        """A human-readable explanation, one or more lines."""
        cause = self.__cause__
        if isinstance(cause, EnclaveError) and cause.diagnostics() != str(cause):
            return f"{self}\n{cause.diagnostics()}"
        return str(self)


class VerificationRefusedError(ClientError):
    """The enclave's certificate or fresh evidence did not check out; no input was sent."""

    exit_code = 3


class QuotaExhaustedError(ClientError):
    """The deployment has no inference left (``RESOURCE_EXHAUSTED``)."""

    exit_code = 4


class SuspendedError(ClientError):
    """The deployment is suspended or its quota was revoked (``PERMISSION_DENIED``)."""

    exit_code = 5


class InvalidInputError(ClientError):
    """The enclave (or the client, before sending) rejected the input."""


class EnclaveUnavailableError(ClientError):
    """The enclave cannot be reached, or it cannot reach its custodian past the grace period."""


class EnclaveBusyError(EnclaveUnavailableError):
    """The enclave runs as many generations as it can and its queue is full; retry later."""


class EnclaveNotListeningError(EnclaveUnavailableError):
    """Nothing listens at the enclave's address: it is stopped, or it zeroized and closed its port."""


class EnclaveChangedError(EnclaveUnavailableError):
    """Another certificate than the verified one answers at the enclave's address; connect again."""


class NotReadyError(ClientError):
    """The enclave has no model loaded yet (``FAILED_PRECONDITION``)."""


class ModelChangedError(ClientError):
    """The enclave answered with another model than the one it attested; connect again to verify it."""
