"""The custodian's data directory: owned by the custodian's user, closed to everyone else.

Everything the custodian keeps is in one directory: CA keys, the key-encryption
key, the ledger, the sealed models. Whoever can replace a file there can make
the custodian use their key (a pre-created all-zero ``kek`` lets its creator
decrypt every model sealed afterwards), so before using the directory the
custodian checks, like ssh with ``~/.ssh`` and Vault with its plugin directory:

- the directory, ``models/`` and ``collateral/`` belong to the custodian's user
  and are open to no one else (0700), and are real directories, not symbolic
  links (the documents under ``collateral/`` are signed by their vendor and
  checked at every use, so they are not checked here file by file);
- every file in them belongs to that user, is a regular file (not a link) and
  is not writable by group or others; what an older version left readable
  (certificates and the ledger at 0644) is tightened to 0600;
- key files (``*.key``, ``kek``) must be 0600 already (one that others could
  read is refused, not quietly tightened), and are opened with ``O_NOFOLLOW``.

A refusal names the path and what is wrong with it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from custodian.errors import ConfigError

PRIVATE_FILE = 0o600
PRIVATE_DIRECTORY = 0o700
# Subdirectories the custodian itself makes; any other directory in the data directory is refused.
SUBDIRECTORIES = ("models",)
# Subdirectories of vendor-signed documents (the collateral caches): checked as directories, their
# contents not file by file, since every document is checked against its vendor's pinned root at use.
SIGNED_SUBDIRECTORIES = ("collateral",)


def prepare(data: Path, *, uid: int | None = None) -> None:
    """Create the data directory if needed, check it and everything in it; tighten 0644 files to 0600."""
    owner = os.geteuid() if uid is None else uid
    data.mkdir(mode=PRIVATE_DIRECTORY, parents=True, exist_ok=True)
    _check_directory(data, owner, follow=True)
    for name in SUBDIRECTORIES:
        sub = data / name
        if not sub.is_symlink():
            sub.mkdir(mode=PRIVATE_DIRECTORY, exist_ok=True)
        _check_directory(sub, owner, follow=False)
    for name in SIGNED_SUBDIRECTORIES:
        sub = data / name
        if not sub.is_symlink():
            sub.mkdir(mode=PRIVATE_DIRECTORY, exist_ok=True)
        _check_directory(sub, owner, follow=False)
    skipped = {*SUBDIRECTORIES, *SIGNED_SUBDIRECTORIES}
    for directory in (data, *(data / name for name in SUBDIRECTORIES)):
        with os.scandir(directory) as entries:
            paths = [Path(e.path) for e in entries if not (directory == data and e.name in skipped)]
        for path in paths:
            _check_file(path, owner)


def read_private(path: Path, *, uid: int | None = None) -> bytes:
    """A key file's bytes: a regular file, not a link, owned by ``uid`` and 0600."""
    owner = os.geteuid() if uid is None else uid
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link; a key file must be a regular file") from None
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        problem = _file_problem(info, owner) or _key_problem(info)
        if problem:
            raise ConfigError(f"{path} {problem}")
        return handle.read()


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` (0600, never through a link) and write ``data``; refuse to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def create_private(path: Path) -> None:
    """Make an empty 0600 file at ``path`` unless one is there (the ledger, before SQLite opens it)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE))
    except FileExistsError:
        pass


def _check_directory(path: Path, owner: int, *, follow: bool) -> None:
    info = path.stat() if follow else path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a directory"
        raise ConfigError(f"{path} is {what}; the custodian makes this directory itself")
    if info.st_uid != owner:
        raise ConfigError(
            f"{path} belongs to uid {info.st_uid}, not to the custodian's user (uid {owner});"
            " someone else could have put keys there: move it away and start again"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(
            f"{path} is mode {stat.S_IMODE(info.st_mode):04o}, open to other users; chmod 700 it"
        )


def _check_file(path: Path, owner: int) -> None:
    info = path.lstat()
    if stat.S_ISSOCK(info.st_mode) and info.st_uid == owner:
        return  # the admin socket a stopped custodian left; it is replaced at start
    problem = _file_problem(info, owner) or (_key_problem(info) if _is_key(path) else "")
    if problem:
        raise ConfigError(f"{path} {problem}")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, PRIVATE_FILE, follow_symlinks=False)


def _is_key(path: Path) -> bool:
    return path.suffix == ".key" or path.name == "kek"


def _key_problem(info: os.stat_result) -> str:
    if stat.S_IMODE(info.st_mode) & 0o077:
        return (
            f"is mode {stat.S_IMODE(info.st_mode):04o}; a key file must be 0600 (if no one else could"
            " have read it, chmod 600 it)"
        )
    return ""


def _file_problem(info: os.stat_result, owner: int) -> str:
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link; the data directory holds regular files only"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file; the data directory holds regular files only"
    if info.st_uid != owner:
        return (
            f"belongs to uid {info.st_uid}, not to the custodian's user (uid {owner});"
            " someone else could have put it there: remove it"
        )
    if stat.S_IMODE(info.st_mode) & 0o022:
        return f"is mode {stat.S_IMODE(info.st_mode):04o}, writable by other users; remove it"
    return ""
