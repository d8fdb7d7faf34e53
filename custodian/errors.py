"""Errors of the custodian: one base class, one subclass per way a request can fail.

Each subclass says which gRPC status it becomes; the mapping itself is done
once, in ``custodian._status``.
"""

from __future__ import annotations


class CustodianError(Exception):
    """Base of every error raised by the ``custodian`` package."""

    def diagnostics(self) -> str:
        """A human-readable explanation, one or more lines."""
        return str(self)


class InvalidRequestError(CustodianError):
    """The request is malformed or out of bounds (``INVALID_ARGUMENT``)."""


class NotFoundError(CustodianError):
    """The named model, deployment, instance or lease does not exist (``NOT_FOUND``)."""


class ConflictError(CustodianError):
    """The name is already taken (``ALREADY_EXISTS``)."""


class RefusedError(CustodianError):
    """The caller may not do this: enrolment refused, deployment suspended (``PERMISSION_DENIED``)."""


class SuspendedError(CustodianError):
    """The deployment is suspended: no instance may enrol until it resumes (``FAILED_PRECONDITION``)."""


class BusyError(CustodianError):
    """A bounded resource is full, e.g. too many outstanding challenges (``RESOURCE_EXHAUSTED``)."""


class ConfigError(CustodianError):
    """The configuration or the data directory is unusable."""


class LedgerError(CustodianError):
    """The ledger is unreadable, from a newer version, or its audit chain is broken."""


class LedgerUnavailableError(LedgerError):
    """The ledger's database cannot be reached now (a replica cut off from PostgreSQL): try again,
    or another replica."""


class ConsoleError(CustodianError):
    """The console could not reach the custodian, or the custodian refused the command."""


class ModelFormatError(CustodianError):
    """A model file is unreadable, or of an architecture, type or tokenizer Custos does not convert."""
