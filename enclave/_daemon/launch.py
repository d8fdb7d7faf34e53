"""The ``enclave`` console script's entry: quiet gRPC's C core before anything imports grpc.

gRPC's C core reads ``GRPC_VERBOSITY`` once, when the library is loaded, and
otherwise prints its own log lines (``E1205 ... add_port.cc:83] ...``) on the
console for errors the CLI explains in one line of its own. So the variable
is set here, before ``enclave._daemon.cli`` imports grpc: ``NONE``, or
``ERROR`` with ``--verbose``; a value the operator set is kept.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    verbose = any(arg in ("-v", "--verbose") for arg in sys.argv[1:])
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if verbose else "NONE")
    from enclave._daemon.cli import main as cli_main  # after the variable is set

    return cli_main()
