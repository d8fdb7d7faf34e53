"""Keep the daemon's memory to itself: no core dumps, no ptrace attach, no swap where allowed.

The plaintext model, the data key and the identity key live in this process's
memory. ``protect_process`` runs once at start, before any of them exist:

- ``prctl(PR_SET_DUMPABLE, 0)``: no core dump, and a process of the same user
  can no longer ptrace it or read its ``/proc/PID/mem`` (root still can: on a
  host where the borrower is root, only the TEE protects memory);
- ``RLIMIT_CORE`` 0, so a crash writes no core file even if something makes
  the process dumpable again;
- ``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)``, as HashiCorp Vault
  does, so no page is written to swap: best effort, since it needs
  ``CAP_IPC_LOCK`` or an unlimited ``RLIMIT_MEMLOCK`` (under a finite limit,
  ``MCL_FUTURE`` would make allocations past it fail, a model load among
  them), so it is tried only then; otherwise the log says so once.
  ``MCL_ONFAULT`` locks pages as they are touched instead of faulting in every
  thread's whole stack at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4
CAP_IPC_LOCK = 14


@dataclass(frozen=True)
class Protection:
    """What ``protect_process`` achieved (each False where the system refused)."""

    undumpable: bool
    no_core_files: bool
    memory_locked: bool


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def dumpable() -> bool:
    """Whether this process may be dumped or ptrace-attached by its own user."""
    libc = _libc()
    return libc is None or bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


def protect_process() -> Protection:
    libc = _libc()
    undumpable = libc is not None and libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    if not undumpable:
        logger.warning("cannot make the process undumpable: core dumps and ptrace attach stay possible")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        no_core_files = True
    except (ValueError, OSError):
        no_core_files = False
        logger.warning("cannot set RLIMIT_CORE to 0")
    memory_locked = _lock_memory(libc)
    if memory_locked:
        logger.info("process memory locked, not dumpable, no core files")
    return Protection(undumpable=undumpable, no_core_files=no_core_files, memory_locked=memory_locked)


def _lock_memory(libc: ctypes.CDLL | None) -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if libc is None:
        reason = "not Linux"
    elif soft != resource.RLIM_INFINITY and not _has_capability(CAP_IPC_LOCK):
        reason = f"RLIMIT_MEMLOCK is {soft} bytes and the process lacks CAP_IPC_LOCK"
    elif libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
        return True
    else:
        reason = f"mlockall: {os.strerror(ctypes.get_errno())}"
        libc.munlockall()  # a refused mlockall must leave nothing half locked
    logger.warning(
        "memory not locked (%s): the model and keys may be swapped to disk; "
        "grant CAP_IPC_LOCK or lift RLIMIT_MEMLOCK to lock them",
        reason,
    )
    return False


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False
