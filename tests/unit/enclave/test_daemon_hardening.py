"""The daemon process keeps its memory to itself: not dumpable, no core files, memory locked if allowed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and mlockall are Linux's")

_PROBE = """
import json, resource
from enclave._daemon.hardening import dumpable, protect_process
before = dumpable()
protection = protect_process()
print(json.dumps({
    "before": before,
    "after": dumpable(),
    "core": resource.getrlimit(resource.RLIMIT_CORE),
    "reported": [protection.undumpable, protection.no_core_files],
    "locked": protection.memory_locked,
    "vmlck": next(l for l in open("/proc/self/status") if l.startswith("VmLck")).split()[1],
}))
"""


def test_protect_process_makes_it_undumpable_without_core_files() -> None:
    """Issue 13 item 7: a process of the borrower's user could attach to the daemon or read its core."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    result = json.loads(done.stdout)
    assert result["before"] is True
    assert result["after"] is False
    assert result["core"] == [0, 0]
    assert result["reported"] == [True, True]
    # Locked where allowed (CAP_IPC_LOCK or no RLIMIT_MEMLOCK); otherwise said once in the log.
    if result["locked"]:
        assert int(result["vmlck"]) > 0
    else:
        assert "memory not locked" in done.stderr
