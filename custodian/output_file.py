"""Files the console writes where its user says (``--out``): written beside the target, then renamed.

The bytes go to ``<out>.partial`` in the target's directory, created with
``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600, then renamed over ``<out>``. A
name planted at ``<out>.partial`` (a symlink to a file the user may write, a
file of someone else's) is refused, never followed or truncated; the rename
replaces the directory entry ``<out>``, never what a symlink there points to;
and no reader sees a half-written file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from custodian.errors import ConsoleError

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """A new file to write, which replaces ``path`` once the block ends without an error."""
    partial = path.with_name(path.name + ".partial")
    try:
        descriptor = os.open(partial, _CREATE_FLAGS, 0o600)
    except FileExistsError:
        raise ConsoleError(
            f"cannot write {path}: {partial} exists (left by an interrupted write, or put there by "
            "someone else); check what it is, remove it and try again"
        ) from None
    except OSError as exc:
        raise ConsoleError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConsoleError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_replacing(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as ``replacing`` does."""
    with replacing(path) as handle:
        handle.write(data)
