"""The manifest: reference values for one enclave build on one platform, as TOML.

``enclave manifest`` writes it, the custodian approves it for a deployment,
end users check the enclave against it. A person can read it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from enclave.errors import ManifestError

MANIFEST_FORMAT = "custos-manifest/1"
MAX_MANIFEST_BYTES = 64 * 1024
_HEX = re.compile(r"^[0-9a-f]*$")


@dataclass(frozen=True)
class ReferenceValues:
    platform: str
    allow_simulation: bool
    custodian_ca_sha256: str
    code_sha384: str
    allowed_model_sha384: tuple[str, ...] = ()
    # Expected platform registers by name (hex), e.g. {"sim.boot": "..."}.
    registers: Mapping[str, str] = field(default_factory=dict)

    def with_models(self, *sha384: str) -> ReferenceValues:
        merged = tuple(dict.fromkeys((*self.allowed_model_sha384, *sha384)))
        return replace(self, allowed_model_sha384=merged)

    def to_toml(self) -> str:
        lines = [
            "# Custos manifest: reference values for one enclave build on one platform.",
            "# Written by `enclave manifest`; approved by the custodian; checked by end users.",
        ]
        if self.allow_simulation:
            lines.append("# SIMULATION ALLOWED: evidence from the sim platform proves nothing.")
        lines += [
            f'format = "{MANIFEST_FORMAT}"',
            f'platform = "{self.platform}"',
            f"allow_simulation = {'true' if self.allow_simulation else 'false'}",
            f'custodian_ca_sha256 = "{self.custodian_ca_sha256}"',
            f'code_sha384 = "{self.code_sha384}"',
            "allowed_model_sha384 = [" + ", ".join(f'"{m}"' for m in self.allowed_model_sha384) + "]",
            "",
            "[registers]",
            *(f'"{name}" = "{value}"' for name, value in sorted(self.registers.items())),
        ]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str | bytes) -> ReferenceValues:
        raw = text.encode() if isinstance(text, str) else text
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
        try:
            doc = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest is not valid TOML: {exc}") from exc
        if doc.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"manifest format must be {MANIFEST_FORMAT!r}, got {doc.get('format')!r}")
        platform = doc.get("platform")
        if not isinstance(platform, str) or not platform:
            raise ManifestError("manifest names no platform")
        allow_sim = doc.get("allow_simulation", False)
        if not isinstance(allow_sim, bool):
            raise ManifestError("manifest allow_simulation must be true or false")
        models = doc.get("allowed_model_sha384", [])
        if not isinstance(models, list):
            raise ManifestError("manifest allowed_model_sha384 must be a list")
        registers = doc.get("registers", {})
        if not isinstance(registers, dict):
            raise ManifestError("manifest [registers] must be a table")
        return cls(
            platform=platform,
            allow_simulation=allow_sim,
            custodian_ca_sha256=_digest(doc.get("custodian_ca_sha256"), 32, "custodian_ca_sha256"),
            code_sha384=_digest(doc.get("code_sha384"), 48, "code_sha384"),
            allowed_model_sha384=tuple(_digest(m, 48, "allowed_model_sha384 entry") for m in models),
            registers={str(k): _digest(v, None, f"register {k}") for k, v in registers.items()},
        )


def _digest(value: Any, size: int | None, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"manifest {what} is missing")
    text: str = value.lower()
    if not _HEX.match(text) or len(text) % 2:
        raise ManifestError(f"manifest {what} is not hex")
    if size is not None and len(text) != 2 * size:
        raise ManifestError(f"manifest {what} must be {size} bytes of hex, got {len(text) // 2}")
    return text
