"""One enclave, verified once and pinned, verified again whenever the connection to it is lost.

custos-proxy serves many requests over one ``Connection``: the enclave is
verified (``connect``) before the first request, and the connection trusts
exactly the certificate it verified. When the pinned channel meets another
certificate (the enclave enrolled again, or something else answers at its
address) or the enclave cannot be reached, the connection is dropped, and
the next request verifies the enclave again before anything is sent. Why the
last verification failed is kept, to be said to every caller until one succeeds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from client.api import Connection
from client.errors import ClientError, EnclaveUnavailableError, ModelChangedError

logger = logging.getLogger(__name__)

Connect = Callable[[], Connection]


class PinnedEnclave:
    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self.last_failure: ClientError | None = None
        self.verifications = 0

    def connection(self) -> Connection:
        """The verified, pinned connection; verified now if there is none (raises why not)."""
        with self._lock:
            if self._connection is None:
                try:
                    self._connection = self._connect()
                except ClientError as exc:
                    self.last_failure = exc
                    raise
                self.verifications += 1
                self.last_failure = None
                logger.info(
                    "enclave %s verified and pinned (deployment %s, model %s)",
                    self._connection.address,
                    self._connection.deployment,
                    self._connection.model_sha384[:16],
                )
            return self._connection

    def failed(self, connection: Connection, error: ClientError) -> bool:
        """A call on ``connection`` failed with ``error``; True when it was dropped (verify again)."""
        if not isinstance(error, EnclaveUnavailableError | ModelChangedError):
            return False
        with self._lock:
            if self._connection is connection:
                logger.warning("connection to the enclave lost (%s): it is verified again before use", error)
                self._connection = None
                connection.close()
        return True

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
