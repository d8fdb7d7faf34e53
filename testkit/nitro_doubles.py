"""Stand-ins for the Nitro Secure Module and for ``nitro-tpm-attest``, signing with a synthetic chain.

:class:`NsmDouble` answers NSM requests as the device does (CBOR
``{"Attestation": {...}}`` in, ``{"Attestation": {"document": ...}}`` or
``{"Error": ...}`` out), with documents signed by a :class:`~testkit.nitro.NitroPki`.
In this process it is passed to ``NitroEnclaveAttester``; in an enclave child
process, :func:`nsm_site_directory` writes a ``sitecustomize`` that puts it
where the daemon opens the device (everything above the ioctl runs as shipped).
:func:`tpm_tool` writes an executable that takes ``nitro-tpm-attest``'s
arguments and prints a NitroTPM document. ``replay`` makes either answer every
request with one recorded document instead, as an attacker replaying it would.
Only a process that trusts the synthetic root (testkit.nitro) accepts what they sign.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import cbor2

from testkit.nitro import SignedBy, document, load_signer


class NsmDouble:
    """The NSM's request/response protocol, for ``Attestation`` requests."""

    def __init__(self, signer: SignedBy, *, replay: bytes | None = None) -> None:
        self.signer = signer
        self.replay = replay
        self.requests = 0

    def __call__(self, request: bytes) -> bytes:
        self.requests += 1
        try:
            decoded: Any = cbor2.loads(request)
            body = decoded["Attestation"]
            fields = {name: body[name] for name in ("user_data", "nonce", "public_key")}
        except (ValueError, KeyError, TypeError):
            return bytes(cbor2.dumps({"Error": "InvalidArgument"}))
        if any(
            value is not None and (not isinstance(value, bytes) or len(value) > 1024)
            for value in fields.values()
        ):
            return bytes(cbor2.dumps({"Error": "InputTooLarge"}))
        signed = self.replay if self.replay is not None else document(self.signer, **fields)
        return bytes(cbor2.dumps({"Attestation": {"document": signed}}))


_NSM_SITECUSTOMIZE = '''\
"""Written by testkit.nitro_doubles for one enclave process: its NSM is a double."""

from pathlib import Path

import enclave._daemon.nitro_attest as nitro_attest
from testkit.nitro import load_signer
from testkit.nitro_doubles import NsmDouble

_here = Path(__file__).parent
_replay = _here / "replay.cbor"
_double = NsmDouble(
    load_signer((_here / "signer.pem").read_bytes()),
    replay=_replay.read_bytes() if _replay.exists() else None,
)
nitro_attest.NsmDevice = lambda path: _double
'''


def nsm_site_directory(directory: Path, signer_pem: bytes, *, replay: bytes | None = None) -> Path:
    """A directory for an enclave child's ``PYTHONPATH`` whose NSM device is an :class:`NsmDouble`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "signer.pem").write_bytes(signer_pem)
    if replay is not None:
        (directory / "replay.cbor").write_bytes(replay)
    (directory / "sitecustomize.py").write_text(_NSM_SITECUSTOMIZE)
    return directory


def tpm_tool(directory: Path, signer_pem: bytes, *, replay: bytes | None = None) -> Path:
    """An executable ``nitro-tpm-attest`` double in ``directory``; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "signer.pem").write_bytes(signer_pem)
    if replay is not None:
        (directory / "replay.cbor").write_bytes(replay)
    tool = directory / "nitro-tpm-attest"
    tool.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from testkit.nitro_doubles import tpm_tool_main\n"
        "sys.exit(tpm_tool_main(sys.argv[1:]))\n"
    )
    tool.chmod(0o755)
    return tool


def tpm_tool_main(argv: list[str]) -> int:
    """``nitro-tpm-attest [--user-data F] [--nonce F] [--public-key F]``: a NitroTPM document on stdout."""
    parser = argparse.ArgumentParser(prog="nitro-tpm-attest")
    for flag in ("--user-data", "--nonce", "--public-key"):
        parser.add_argument(flag, type=Path)
    args = parser.parse_args(argv)
    here = Path(sys.argv[0]).resolve().parent
    replay = here / "replay.cbor"
    if replay.exists():
        sys.stdout.buffer.write(replay.read_bytes())
        return 0
    fields = {
        name: getattr(args, name).read_bytes() if getattr(args, name) else None
        for name in ("user_data", "nonce", "public_key")
    }
    signer = load_signer((here / "signer.pem").read_bytes())
    sys.stdout.buffer.write(document(signer, tpm=True, **fields))
    return 0
