"""What the enclave measures: its code, its configuration, the model it loads."""

from __future__ import annotations

import hashlib
from pathlib import Path

from enclave.attestation.claims import MeasurementEvent, canonical_json

# The enclave's measured code: its own package and the wire contract it speaks.
_MEASURED_PACKAGES = ("enclave", "protos")
_MEASURED_SUFFIXES = (".py", ".proto")


def code_sha384(root: Path | None = None) -> bytes:
    """SHA-384 over every source file of the enclave build, by sorted relative path."""
    root = root or Path(__file__).resolve().parents[2]
    digest = hashlib.sha384(b"custos-code/1\0")
    for package in _MEASURED_PACKAGES:
        files = sorted(
            p
            for p in (root / package).rglob("*")
            if p.suffix in _MEASURED_SUFFIXES and "__pycache__" not in p.parts and p.is_file()
        )
        for path in files:
            content = path.read_bytes()
            name = path.relative_to(root).as_posix().encode()
            digest.update(len(name).to_bytes(4, "big") + name + len(content).to_bytes(8, "big") + content)
    return digest.digest()


def code_event(root: Path | None = None) -> MeasurementEvent:
    return MeasurementEvent(kind="code", sha384=code_sha384(root), detail={"build": "custos-enclave"})


def custodian_ca_sha256(ca_der: bytes) -> str:
    return hashlib.sha256(ca_der).hexdigest()


def config_event(custodian_ca_der: bytes) -> MeasurementEvent:
    """The configuration that decides whom the enclave trusts: the custodian CA it pins."""
    detail = {"custodian_ca_sha256": custodian_ca_sha256(custodian_ca_der)}
    return MeasurementEvent(
        kind="config", sha384=hashlib.sha384(canonical_json(detail)).digest(), detail=detail
    )


def instance_event(public_key_der: bytes, deployment: str) -> MeasurementEvent:
    """The first entry of an instance: the key it attests with and the deployment it serves."""
    detail = {"public_key_sha256": hashlib.sha256(public_key_der).hexdigest(), "deployment": deployment}
    return MeasurementEvent(
        kind="instance", sha384=hashlib.sha384(canonical_json(detail)).digest(), detail=detail
    )


def model_event(model_sha384: bytes) -> MeasurementEvent:
    return MeasurementEvent(kind="model", sha384=model_sha384, detail={})
