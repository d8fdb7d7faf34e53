"""Caches of collateral documents: a directory (one file per key, written atomically) or memory.

Nothing read from here is trusted: the verifiers check every document against
the vendor root pinned in code, as they check a freshly fetched one. The cache
only spares the vendor's service and keeps serving while it is unreachable.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Protocol

# Keys are relative paths whose parts are plain names: never "..", never absolute.
_KEY_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,199}")


class DocumentCache(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...


class MemoryCache:
    """Documents for the life of the process (the enclave daemon keeps no files)."""

    def __init__(self) -> None:
        self._documents: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._documents.get(key)

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._documents[key] = data


class DiskCache:
    """Documents under ``root`` (made 0700 on first write; files 0600)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        parts = key.split("/")
        if not parts or not all(_KEY_PART.fullmatch(p) and ".." not in p for p in parts):
            raise ValueError(f"not a cache key: {key!r}")
        return self.root.joinpath(*parts)

    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key``; a reader sees the old document or the new one, never a part."""
        target = self.path(key)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
