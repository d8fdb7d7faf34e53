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

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclave.attestation.register_layout import (
    BOOT_CHAIN_PCRS,
    OS_PCR_SETS,
    PLATFORMS,
    RESETTABLE_PCRS,
    TPM_PLATFORM,
    os_pcr_set,
    pcr_register,
    register_size,
)
from enclave.attestation.sim import SIMULATION_WARNING
from enclave.attestation.tpm import DEFAULT_APP_PCR
from enclave.errors import ManifestError

MANIFEST_FORMAT = "custos-manifest/1"
MAX_MANIFEST_BYTES = 64 * 1024
_HEX = re.compile(r"^[0-9a-f]*$")
DEFAULT_TCB_STATUSES = ("UpToDate",)
DCAP_PLATFORMS = ("sgx", "tdx")
TEE_PLATFORMS = ("nitro-enclave", "sev-snp", "sgx", "tdx")
UNMEASURED_OS_WARNING = (
    "UNMEASURED OS allowed: this tpm manifest pins no boot chain up to the OS, so whoever has root"
    " on the borrower's machine can extend the PCRs as the enclave would and take the model"
)

# The registers that pin what runs in a hardware TEE, by platform: each entry names registers of
# which the manifest must pin at least one. Without them, what the claims say about the code is
# the enclave's own word: the measurement log replays into no register on sgx and sev-snp, nor on
# a TD that leaves RTMR3 alone, and is then trusted because the pinned image is.
IDENTITY_REGISTERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "tdx": (("mrtd",), ("rtmr0",), ("rtmr1",), ("rtmr2",)),
    "sgx": (("mrenclave", "mrsigner"),),
    "sev-snp": (("measurement",),),
    # The enclave image file, its kernel and boot ramdisk, its application (AWS Nitro Enclaves).
    "nitro-enclave": (("pcr0",), ("pcr1",), ("pcr2",)),
    # An attestable image: boot loader and unified kernel image, Secure Boot policy, and the
    # kernel command line and initrd as systemd-stub measures them (AWS attestable AMIs).
    "nitro-tpm": (("pcr4",), ("pcr7",), ("pcr12",)),
}


@dataclass(frozen=True)
class ReferenceValues:
    platform: str
    allow_simulation: bool
    custodian_ca_sha256: str
    code_sha384: str
    allowed_model_sha384: tuple[str, ...] = ()
    # Expected platform registers by name (hex), e.g. {"sim.boot": "..."}.
    registers: Mapping[str, str] = field(default_factory=dict)
    # Platform tpm ([tpm] table): the PCR the measurement log is extended into; the CA
    # certificates (PEM) an EK certificate must chain to, checked by the custodian at
    # enrolment before its credential challenge; the CA certificates (PEM) an AK
    # certificate in the evidence must chain to (the custodian's enclave CA, which certifies
    # an AK after credential activation; the custodian adds it to end users' manifests).
    # Platforms tdx and sgx: the DCAP TCB statuses accepted (a quote whose TCB status was not
    # evaluated, for lack of TCB info collateral, is refused). Platforms tdx, sgx, sev-snp,
    # nitro-enclave:
    # whether a debug TD, enclave or guest is accepted.
    accepted_tcb_statuses: tuple[str, ...] = DEFAULT_TCB_STATUSES
    allow_debug: bool = False
    tpm_app_pcr: int = DEFAULT_APP_PCR
    tpm_ek_roots: str = ""
    tpm_ak_roots: str = ""
    # Platform sev-snp ([sev_snp] table): the lowest REPORTED_TCB accepted, by component
    # (bootloader, tee, snp, microcode, and fmc on Turin), and whether a migration agent
    # may be bound to the guest (guest policy bit MIGRATE_MA).
    snp_min_tcb: Mapping[str, int] = field(default_factory=dict)
    snp_allow_migration_agent: bool = False
    # Platform tpm: accept a manifest that pins no accepted boot-chain PCR set (OS_PCR_SETS).
    # Then nothing attests the OS the daemon runs in, and every tool says so.
    allow_unmeasured_os: bool = False
    # Platforms tdx and sgx: TCB info and QE identity from an earlier TCB evaluation
    # (tcbEvaluationDataNumber) are refused, expired or not, so that old collateral
    # cannot hide a TCB recovery. None: any unexpired collateral.
    min_tcb_evaluation_data_number: int | None = None

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise ManifestError(f"manifest platform {self.platform!r} is not one of {', '.join(PLATFORMS)}")
        if self.platform == "sim" and not self.allow_simulation:
            raise ManifestError(
                "a sim manifest without allow_simulation = true can never pass: sim evidence is simulated"
            )
        if self.allow_unmeasured_os and self.platform != TPM_PLATFORM:
            raise ManifestError(f"allow_unmeasured_os is for tpm manifests, not {self.platform}")
        for name, value in self.registers.items():
            size = register_size(self.platform, name)
            if size is None:
                raise ManifestError(
                    f"register {name!r} is never in {self.platform} evidence, so the manifest can never pass"
                )
            if len(value) != 2 * size:
                raise ManifestError(
                    f"register {name} must be {size} bytes of hex, got {len(value) // 2}: it can never match"
                )
        if self.platform == TPM_PLATFORM:
            self._check_tpm()
        missing = [
            " or ".join(names)
            for names in IDENTITY_REGISTERS.get(self.platform, ())
            if not any(name in self.registers for name in names)
        ]
        if missing:
            raise ManifestError(
                f"a {self.platform} manifest must pin the registers that identify the build"
                f" (missing: {', '.join(missing)}): without them the enclave's claims about its"
                " code are its own word"
            )

    def _check_tpm(self) -> None:
        if self.tpm_app_pcr in (*BOOT_CHAIN_PCRS, *RESETTABLE_PCRS):
            raise ManifestError(
                f"[tpm] app_pcr {self.tpm_app_pcr} is a boot-chain or resettable PCR; the log needs its own"
            )
        for name in self.registers:
            pcr = pcr_register(name)
            if pcr is not None and pcr[1] == self.tpm_app_pcr:
                raise ManifestError(
                    f"register {name} is the application PCR, which holds each instance's own log: "
                    "the verifier replays it, a fixed value can never pass"
                )
        if os_pcr_set(self.registers) is None and not self.allow_unmeasured_os:
            sets = "; ".join(f"{name}: {_pcr_list(pcrs)}" for name, pcrs in OS_PCR_SETS.items())
            raise ManifestError(
                "a tpm manifest must pin the PCRs that measure the boot chain up to the OS"
                f" ({sets}), or say allow_unmeasured_os = true: without them anyone with root on"
                " the machine can extend the application PCR as the enclave would"
            )

    @property
    def warnings(self) -> tuple[str, ...]:
        """What every tool that accepts this manifest must say out loud."""
        found = []
        if self.allow_simulation:
            found.append(SIMULATION_WARNING)
        if self.allow_unmeasured_os:
            found.append(UNMEASURED_OS_WARNING)
        return tuple(found)

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
        if self.allow_unmeasured_os:
            lines.append(f"# {UNMEASURED_OS_WARNING}.")
        lines += [
            f'format = "{MANIFEST_FORMAT}"',
            f'platform = "{self.platform}"',
            f"allow_simulation = {'true' if self.allow_simulation else 'false'}",
            f'custodian_ca_sha256 = "{self.custodian_ca_sha256}"',
            f'code_sha384 = "{self.code_sha384}"',
            "allowed_model_sha384 = [" + ", ".join(f'"{m}"' for m in self.allowed_model_sha384) + "]",
            *(
                [
                    "accepted_tcb_statuses = ["
                    + ", ".join(f'"{status}"' for status in self.accepted_tcb_statuses)
                    + "]",
                ]
                if self.platform in DCAP_PLATFORMS
                else []
            ),
            *(
                [f"min_tcb_evaluation_data_number = {self.min_tcb_evaluation_data_number}"]
                if self.platform in DCAP_PLATFORMS and self.min_tcb_evaluation_data_number is not None
                else []
            ),
            *(
                [f"allow_debug = {'true' if self.allow_debug else 'false'}"]
                if self.platform in TEE_PLATFORMS
                else []
            ),
            "",
            "[registers]",
            *(f'"{name}" = "{value}"' for name, value in sorted(self.registers.items())),
        ]
        if self.platform == "sev-snp":
            lines += [
                "",
                "[sev_snp]",
                f"allow_migration_agent = {str(self.snp_allow_migration_agent).lower()}",
            ]
            if self.snp_min_tcb:
                pairs = ", ".join(f"{k} = {v}" for k, v in sorted(self.snp_min_tcb.items()))
                lines.append(f"min_tcb = {{ {pairs} }}")
        if self.platform == "tpm":
            lines += ["", "[tpm]", f"app_pcr = {self.tpm_app_pcr}"]
            if self.allow_unmeasured_os:
                lines.append("allow_unmeasured_os = true")
            for key, pem in (("ek_roots", self.tpm_ek_roots), ("ak_roots", self.tpm_ak_roots)):
                if pem:  # a TOML literal string: PEM holds no quote
                    lines.append(f"{key} = '''\n{pem.strip()}\n'''")
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
        tpm = doc.get("tpm", {})
        if not isinstance(tpm, dict):
            raise ManifestError("manifest [tpm] must be a table")
        if tpm and platform != "tpm":
            raise ManifestError(f"manifest has a [tpm] table but its platform is {platform!r}")
        app_pcr = tpm.get("app_pcr", DEFAULT_APP_PCR)
        if isinstance(app_pcr, bool) or not isinstance(app_pcr, int) or not 0 <= app_pcr <= 23:
            raise ManifestError("manifest [tpm] app_pcr must be a PCR index, 0-23")
        unmeasured_os = tpm.get("allow_unmeasured_os", False)
        if not isinstance(unmeasured_os, bool):
            raise ManifestError("manifest [tpm] allow_unmeasured_os must be true or false")
        statuses = doc.get("accepted_tcb_statuses", list(DEFAULT_TCB_STATUSES))
        if not isinstance(statuses, list) or not all(isinstance(x, str) and x for x in statuses):
            raise ManifestError("manifest accepted_tcb_statuses must be a list of TCB status names")
        allow_debug = doc.get("allow_debug", False)
        if not isinstance(allow_debug, bool):
            raise ManifestError("manifest allow_debug must be true or false")
        snp_min_tcb, snp_allow_ma = _sev_snp_table(doc.get("sev_snp", {}), platform)
        min_evaluation = doc.get("min_tcb_evaluation_data_number")
        if min_evaluation is not None and (
            platform not in DCAP_PLATFORMS
            or isinstance(min_evaluation, bool)
            or not isinstance(min_evaluation, int)
            or not 0 <= min_evaluation < 2**32
        ):
            raise ManifestError("manifest min_tcb_evaluation_data_number is a number, for tdx and sgx only")
        return cls(
            min_tcb_evaluation_data_number=min_evaluation,
            platform=platform,
            accepted_tcb_statuses=tuple(statuses),
            allow_debug=allow_debug,
            snp_min_tcb=snp_min_tcb,
            snp_allow_migration_agent=snp_allow_ma,
            allow_simulation=allow_sim,
            custodian_ca_sha256=_digest(doc.get("custodian_ca_sha256"), 32, "custodian_ca_sha256"),
            code_sha384=_digest(doc.get("code_sha384"), 48, "code_sha384"),
            allowed_model_sha384=tuple(_digest(m, 48, "allowed_model_sha384 entry") for m in models),
            registers={str(k): _digest(v, None, f"register {k}") for k, v in registers.items()},
            tpm_app_pcr=app_pcr,
            allow_unmeasured_os=unmeasured_os,
            tpm_ek_roots=_pem_certificates(tpm.get("ek_roots", ""), "[tpm] ek_roots"),
            tpm_ak_roots=_pem_certificates(tpm.get("ak_roots", ""), "[tpm] ak_roots"),
        )


def _pcr_list(pcrs: tuple[int, ...]) -> str:
    runs: list[str] = []
    for pcr in pcrs:
        if runs and runs[-1].split("-")[-1] == str(pcr - 1):
            runs[-1] = f"{runs[-1].split('-')[0]}-{pcr}"
        else:
            runs.append(str(pcr))
    return "PCRs " + ", ".join(runs)


def _pem_certificates(value: Any, what: str) -> str:
    """PEM text holding one or more X.509 certificates, or empty."""
    if not isinstance(value, str):
        raise ManifestError(f"manifest {what} must be PEM text")
    if not value.strip():
        return ""
    try:
        certificates = x509.load_pem_x509_certificates(value.encode())
    except ValueError as exc:
        raise ManifestError(f"manifest {what} is not PEM certificates: {exc}") from None
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certificates)


SNP_TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode", "fmc")


def _sev_snp_table(table: Any, platform: str) -> tuple[dict[str, int], bool]:
    if not isinstance(table, dict):
        raise ManifestError("manifest [sev_snp] must be a table")
    if table and platform != "sev-snp":
        raise ManifestError(f"manifest has a [sev_snp] table but its platform is {platform!r}")
    allow_ma = table.get("allow_migration_agent", False)
    if not isinstance(allow_ma, bool):
        raise ManifestError("manifest [sev_snp] allow_migration_agent must be true or false")
    min_tcb = table.get("min_tcb", {})
    if not isinstance(min_tcb, dict) or not all(
        k in SNP_TCB_COMPONENTS and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
        for k, v in min_tcb.items()
    ):
        raise ManifestError(
            f"manifest [sev_snp] min_tcb must map components ({', '.join(SNP_TCB_COMPONENTS)}) to 0-255"
        )
    return dict(min_tcb), allow_ma


def _digest(value: Any, size: int | None, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"manifest {what} is missing")
    text: str = value.lower()
    if not _HEX.match(text) or len(text) % 2:
        raise ManifestError(f"manifest {what} is not hex")
    if size is not None and len(text) != 2 * size:
        raise ManifestError(f"manifest {what} must be {size} bytes of hex, got {len(text) // 2}")
    return text
