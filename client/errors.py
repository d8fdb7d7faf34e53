"""Errors of the client: one base class; the CLI maps each to an exit code."""

from __future__ import annotations


class ClientError(Exception):
    """Base of every error the client raises."""

    exit_code = 1


class VerificationRefusedError(ClientError):
    """The enclave's evidence did not check out; no input was sent."""

    exit_code = 3


class QuotaExhaustedError(ClientError):
    exit_code = 4


class SuspendedError(ClientError):
    """The deployment is suspended or its quota was revoked."""

    exit_code = 5


class InvalidInputError(ClientError):
    """The enclave (or the client, before sending) rejected the input."""


class EnclaveUnavailableError(ClientError):
    """The enclave cannot be reached, or it cannot reach its custodian past the grace period."""


class NotReadyError(ClientError):
    """The enclave has no model loaded yet."""
