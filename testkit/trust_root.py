"""Make one test's child processes trust that test's synthetic DCAP root, and nothing else does.

The Intel SGX Root CA is pinned in code (``enclave.attestation.dcap``). A test
that runs the custodian as a process and feeds it quotes from a synthetic PCK
chain writes, with :func:`site_directory`, a ``sitecustomize.py`` and the root
into a directory of its own, and puts that directory on the child's
``PYTHONPATH``: Python imports it at start-up, and it replaces the pinned root
in that one process. The shipped tools read no flag, file or variable for it.
In the test's own process, ``monkeypatch`` does the same.
"""

from __future__ import annotations

from pathlib import Path

_SITECUSTOMIZE = '''\
"""Written by testkit.trust_root for one test's child processes: trust its synthetic DCAP root."""

from pathlib import Path

import enclave.attestation.dcap

enclave.attestation.dcap.INTEL_SGX_ROOT_CA_DER = Path(__file__).with_name("dcap-root.der").read_bytes()
'''


def site_directory(directory: Path, root_der: bytes) -> Path:
    """A directory for a child's ``PYTHONPATH`` that makes it trust ``root_der`` as the DCAP root."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dcap-root.der").write_bytes(root_der)
    (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return directory
