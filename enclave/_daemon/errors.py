"""Errors of the enclave daemon, all derived from ``enclave.errors.EnclaveError``."""

from __future__ import annotations

from enclave.errors import EnclaveError


class DaemonError(EnclaveError):
    """Base of every error the daemon raises itself."""


class ConfigError(DaemonError):
    """A flag, a file named by a flag, or a configuration bound is unusable."""


class UsageError(ConfigError):
    """Flags that do not go together (the command line is misused: exit status 2)."""


class ListenError(ConfigError):
    """A listener could not be bound (the address is in use, or not this host's)."""


class TpmDeviceError(DaemonError):
    """The TPM could not be opened or refused a command; the message names the step."""


class InvalidInputError(DaemonError):
    """An inference input was refused before it used any quota. The message says why."""


class BusyError(DaemonError):
    """Too many calls are waiting for the same kind of work; the caller may retry later."""

    def __init__(self, work: str) -> None:
        super().__init__(f"enclave is busy ({work}): too many calls waiting, retry later")


class GenerationsBusyError(DaemonError):
    """Every generation slot is taken and the queue for them is full (``RESOURCE_EXHAUSTED``)."""

    def __init__(self, running: int, waiting: int) -> None:
        super().__init__(f"enclave is busy: {running} generations running and {waiting} waiting, retry later")


class WrongModelKindError(InvalidInputError):
    """A classifier call to a language model, or a generation asked of a classifier."""


class ModelNotLoadedError(DaemonError):
    """No model is loaded (yet), so there is nothing to run."""

    def __init__(self) -> None:
        super().__init__("no model is loaded yet")


class ModelRefusedError(DaemonError):
    """The model pushed by the custodian did not decrypt, check out or load."""


class InferenceError(DaemonError):
    """The model runtime failed on an input that passed validation."""


class QuotaError(DaemonError):
    """The local lease does not allow one more inference. Subclasses say why."""


class SuspendedError(QuotaError):
    def __init__(self) -> None:
        super().__init__("deployment is suspended")


class LeaseRevokedError(QuotaError):
    """The unit reserved for a call was taken back by the custodian while it ran."""

    def __init__(self) -> None:
        super().__init__("lease was revoked")


class QuotaExhaustedError(QuotaError):
    """``units``: what ran out, "inference" for a classifier, "tokens" for a language model."""

    def __init__(self, units: str = "inference") -> None:
        super().__init__(f"no {units} left in the lease or the deployment's balance")


class CustodianOfflineError(QuotaError):
    def __init__(self) -> None:
        super().__init__("custodian unreachable past the offline grace")


class CustodianUnreachableError(DaemonError):
    """The custodian could not be reached at start (network, TLS or a timeout)."""


class CustodianCertificateError(ConfigError):
    """The custodian's TLS certificate does not chain to the pinned ``--custodian-ca``."""


class EnrolmentRefusedError(DaemonError):
    """The custodian refused to enrol this enclave; the message carries its reason."""


class DeploymentSuspendedError(EnrolmentRefusedError):
    """The deployment is suspended: the custodian enrols no instance until it resumes."""


class LeaseUnavailableError(DaemonError):
    """The custodian did not grant a lease when the daemon started."""


class ProtocolError(DaemonError):
    """The custodian answered something the protocol does not allow."""
