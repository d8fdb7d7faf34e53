"""AWS Nitro attesters: Nitro Enclaves through the NSM device, NitroTPM through ``nitro-tpm-attest``.

Nitro Enclaves: the Nitro Secure Module is ``/dev/nsm`` inside the enclave.
One ``ioctl`` (``_IOWR(0x0A, 0, struct nsm_raw)``: two ``{u64 addr, u64 len}``
buffers, request at most 4 KiB, response at most 12 KiB; the upstream Linux
driver requires CAP_SYS_ADMIN) carries the CBOR request
``{"Attestation": {"user_data": null, "nonce": REPORT_DATA, "public_key": null}}``
and returns ``{"Attestation": {"document": DOC}}`` or ``{"Error": NAME}``.

NitroTPM: AWS's ``nitro-tpm-attest`` (package aws-nitro-tpm-tools) asks the
TPM for a document through AWS's vendor command for NSM requests and prints
it; it takes the nonce from a file (``--nonce FILE``). Any process with access
to the TPM can do the same, which is why a NitroTPM document proves only what
booted (README, Platforms).

On both, the 64-byte report data travels as the document's ``nonce``; the
attester checks that the document it got back is of its platform and carries
exactly that nonce before it hands it on. Neither has a register this daemon
extends: the measurement log is bound through the nonce, and the PCRs the
manifest pins vouch for the code that wrote it.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import cbor2

from enclave._daemon.errors import ConfigError
from enclave.attestation import Attester, Evidence
from enclave.attestation.nitro import PART_DOCUMENT, PLATFORM_ENCLAVE, PLATFORM_TPM
from enclave.attestation.nitro_document import MAX_DOCUMENT_BYTES, parse_document
from enclave.errors import EvidenceError

logger = logging.getLogger(__name__)

NSM_DEVICE = Path("/dev/nsm")
NSM_IOCTL_RAW = 0xC0200A00  # _IOWR(0x0A, 0, struct nsm_raw), 32 bytes
NSM_REQUEST_MAX = 0x1000
NSM_RESPONSE_MAX = 0x3000
NITRO_TPM_ATTEST = "nitro-tpm-attest"
TOOL_TIMEOUT_S = 30.0

# What carries one CBOR request to the NSM and brings its response back.
NsmTransport = Callable[[bytes], bytes]


class _NsmIovec(ctypes.Structure):
    _fields_ = (("addr", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _NsmRaw(ctypes.Structure):
    _fields_ = (("request", _NsmIovec), ("response", _NsmIovec))


class NsmDevice:
    """The Nitro Secure Module character device: one ioctl per request."""

    def __init__(self, path: Path = NSM_DEVICE) -> None:
        self.path = path

    def __call__(self, request: bytes) -> bytes:
        if len(request) > NSM_REQUEST_MAX:
            raise EvidenceError(f"NSM request is {len(request)} bytes, over {NSM_REQUEST_MAX}")
        request_buffer = ctypes.create_string_buffer(request, len(request))
        response_buffer = ctypes.create_string_buffer(NSM_RESPONSE_MAX)
        message = _NsmRaw(
            _NsmIovec(ctypes.addressof(request_buffer), len(request)),
            _NsmIovec(ctypes.addressof(response_buffer), NSM_RESPONSE_MAX),
        )
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(
                f"cannot open the Nitro Secure Module {self.path}: {exc.strerror}"
                " (is this a Nitro Enclave, and the daemon allowed to use it?)"
            ) from None
        try:
            fcntl.ioctl(fd, NSM_IOCTL_RAW, message, True)
        except OSError as exc:
            raise EvidenceError(f"the NSM request on {self.path} failed: {exc.strerror}") from None
        finally:
            os.close(fd)
        size = min(message.response.len, NSM_RESPONSE_MAX)
        return response_buffer.raw[:size]


def nsm_attestation_request(report_data: bytes) -> bytes:
    """The CBOR ``Attestation`` request that puts ``report_data`` in the document's nonce."""
    return bytes(cbor2.dumps({"Attestation": {"user_data": None, "nonce": report_data, "public_key": None}}))


def nsm_attestation_document(response: bytes) -> bytes:
    """The document in an NSM ``Attestation`` response; an ``Error`` response names its error."""
    try:
        decoded: Any = cbor2.loads(response)
    except Exception as exc:  # a device's answer we cannot decode, whatever the decoder says about it
        raise EvidenceError(f"the NSM response is not CBOR: {type(exc).__name__}") from None
    if isinstance(decoded, dict) and "Error" in decoded:
        raise EvidenceError(f"the NSM refused the attestation request: {decoded['Error']!r}")
    body = decoded.get("Attestation") if isinstance(decoded, dict) else None
    document = body.get("document") if isinstance(body, dict) else None
    if not isinstance(document, bytes):
        raise EvidenceError("the NSM response is not an Attestation response with a document")
    return document


def _checked(platform: str, document: bytes, report_data: bytes) -> Evidence:
    """Evidence from ``document``, once it is of ``platform`` and carries ``report_data`` as its nonce."""
    parsed = parse_document(document)
    kind = PLATFORM_TPM if parsed.is_tpm else PLATFORM_ENCLAVE
    if kind != platform:
        raise EvidenceError(f"the attestation document is from {kind}, not {platform}")
    if parsed.nonce != report_data:
        raise EvidenceError("the attestation document does not carry the nonce it was asked for")
    return Evidence(platform=platform, parts={PART_DOCUMENT: document})


class NitroEnclaveAttester(Attester):
    """``nitro-enclave`` evidence: a document from the Nitro Secure Module."""

    platform = PLATFORM_ENCLAVE

    def __init__(self, nsm: NsmTransport | None = None) -> None:
        self._nsm = nsm or NsmDevice()

    def extend(self, event_digests: Mapping[str, bytes]) -> None:
        """The log is bound through the document's nonce; PCR0-2 vouch for the code that wrote it."""

    def collect(self, report_data: bytes) -> Evidence:
        if len(report_data) != 64:
            raise ValueError("report data must be 64 bytes")
        document = nsm_attestation_document(self._nsm(nsm_attestation_request(report_data)))
        return _checked(self.platform, document, report_data)


class NitroTpmAttester(Attester):
    """``nitro-tpm`` evidence: a document from NitroTPM, through AWS's ``nitro-tpm-attest``."""

    platform = PLATFORM_TPM

    def __init__(self, tool: str | None = None) -> None:
        found = shutil.which(tool or NITRO_TPM_ATTEST)
        if found is None:
            raise ConfigError(
                f"{tool or NITRO_TPM_ATTEST} not found: install aws-nitro-tpm-tools"
                " (Amazon Linux: yum install aws-nitro-tpm-tools) or give --nitro-tpm-attest PATH"
            )
        self._tool = found

    def extend(self, event_digests: Mapping[str, bytes]) -> None:
        """The log is bound through the document's nonce; the boot PCRs vouch for the image that wrote it."""

    def collect(self, report_data: bytes) -> Evidence:
        if len(report_data) != 64:
            raise ValueError("report data must be 64 bytes")
        with tempfile.TemporaryDirectory(prefix="custos-nitro-") as scratch:
            nonce = Path(scratch) / "nonce"
            nonce.write_bytes(report_data)
            try:
                done = subprocess.run(  # noqa: S603  (our own argument list, no shell)
                    [self._tool, "--nonce", str(nonce)],
                    capture_output=True,
                    timeout=TOOL_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise EvidenceError(f"{self._tool} did not answer within {TOOL_TIMEOUT_S:.0f} s") from None
            except OSError as exc:
                raise EvidenceError(f"cannot run {self._tool}: {exc.strerror}") from None
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            raise EvidenceError(
                f"{self._tool} failed ({done.returncode}): {lines[-1] if lines else 'no message'}"
            )
        if len(done.stdout) > MAX_DOCUMENT_BYTES:
            raise EvidenceError(f"{self._tool} printed {len(done.stdout)} bytes, over a document's limit")
        return _checked(self.platform, done.stdout, report_data)


def open_nitro(platform: str, *, nsm_device: Path | None = None, tpm_tool: str | None = None) -> Attester:
    """The attester for a Nitro ``platform``; raises ``ConfigError`` when its interface is missing."""
    if platform == PLATFORM_ENCLAVE:
        device = nsm_device or NSM_DEVICE
        if not device.exists():
            raise ConfigError(
                f"{device} does not exist: --platform nitro-enclave runs inside a Nitro Enclave"
            )
        return NitroEnclaveAttester(NsmDevice(device))
    if platform == PLATFORM_TPM:
        return NitroTpmAttester(tpm_tool)
    raise ConfigError(f"{platform!r} is not a Nitro platform")
