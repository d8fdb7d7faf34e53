"""An on-disk store of collateral documents, exactly as their service sent them.

One file per document, named by the caller (e.g. ``tdx-tcb-00806F050000.json``,
``amd-crl-Milan-vcek.der``);
a header a service sent beside the body (an issuer chain) is a file of its own.
Writes are atomic (a temporary file, fsync, rename), so a crash leaves the old
copy or the new one, never half of one. Nothing stored here is trusted: the
verifiers check every document against the vendor root pinned in code, so the
cache only saves trips to the service and keeps serving while it is down.

A cache without a directory keeps its documents in memory (the enclave daemon,
which has no data directory). A read-only cache reads a directory that someone
filled by hand (``--collateral-dir`` on an air-gapped site) and never writes.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

from enclave.errors import EnclaveError

logger = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 1024 * 1024
# A plain file name: no "/", no leading dot (so never "." or ".."), short enough that the temporary
# ".NAME.XXXXXXXX" stays under the 255-byte limit of file systems (an AMD VCEK's name is 164).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class CollateralCacheError(EnclaveError):
    """The cache directory cannot be used (permissions, a name that is not a plain file name)."""


class CollateralCache:
    def __init__(
        self, directory: Path | None, *, read_only: bool = False, max_bytes: int = MAX_DOCUMENT_BYTES
    ) -> None:
        self.directory = directory
        self.read_only = read_only
        self._max_bytes = max_bytes
        self._memory: dict[str, bytes] = {}
        if directory is not None and not read_only:
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise CollateralCacheError(
                    f"cannot create collateral cache {directory}: {exc.strerror}"
                ) from exc

    def read(self, name: str) -> bytes | None:
        """The stored document, or None when there is none (or it is over the size limit)."""
        _check_name(name)
        if self.directory is None:
            return self._memory.get(name)
        path = self.directory / name
        try:
            with path.open("rb") as f:
                data = f.read(self._max_bytes + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CollateralCacheError(f"cannot read {path}: {exc.strerror}") from exc
        if len(data) > self._max_bytes:
            logger.warning("ignoring %s: larger than %d bytes", path, self._max_bytes)
            return None
        return data

    def write(self, name: str, data: bytes) -> None:
        _check_name(name)
        if self.read_only:
            raise CollateralCacheError(f"the collateral directory {self.directory} is read-only here")
        if len(data) > self._max_bytes:
            raise CollateralCacheError(f"{name} is {len(data)} bytes, over the {self._max_bytes}-byte limit")
        if self.directory is None:
            self._memory[name] = bytes(data)
            return
        try:
            fd, temp = tempfile.mkstemp(prefix=f".{name}.", dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temp, self.directory / name)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise CollateralCacheError(f"cannot write {self.directory / name}: {exc.strerror}") from exc


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise CollateralCacheError(f"not a plain document name: {name[:80]!r}")
