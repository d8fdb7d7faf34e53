"""The enclave's measured identity: its key, its attester and its measurement log.

Everything the enclave attests to goes through here, so the log the claims
carry is always exactly what was folded into the platform's register.

Attesters for the hardware platforms are imported only when chosen, so the
daemon runs without their libraries (libtss2 for ``tpm``) on other platforms.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec

from enclave._daemon.errors import ConfigError
from enclave.attestation import AttestedClaims, Attester, MeasurementEvent, ReferenceValues, measurement, sim
from enclave.attestation.claims import canonical_json, replay
from enclave.attestation.tpm import DEFAULT_APP_PCR
from enclave.identity import generate_identity_key, public_key_der

if TYPE_CHECKING:
    from enclave._daemon.tpm_device import TpmAttester
    from enclave._daemon.tsm import CollateralSource

logger = logging.getLogger(__name__)

TPM_PLATFORM = "tpm"
TSM_PLATFORMS = ("sev-snp", "tdx")
SGX_PLATFORM = "sgx"
NITRO_PLATFORMS = ("nitro-enclave", "nitro-tpm")
ATTESTER_PLATFORMS = tuple(
    sorted((sim.PLATFORM, TPM_PLATFORM, SGX_PLATFORM, *TSM_PLATFORMS, *NITRO_PLATFORMS))
)
# Platforms whose manifest registers the operator gives (--register), as measured elsewhere.
REGISTER_PLATFORMS = (*TSM_PLATFORMS, SGX_PLATFORM, *NITRO_PLATFORMS)
# Registers a platform sets before the enclave runs, which a manifest pins.
_BOOT_REGISTERS: dict[str, dict[str, str]] = {sim.PLATFORM: {sim.BOOT_REGISTER: sim.BOOT_MEASUREMENT.hex()}}
# Quoted besides the application PCR unless told otherwise: both boot chains of OS_PCR_SETS.
DEFAULT_QUOTE_PCRS = "0-9,11"
# Earlier instances' entries a new instance carries at most: the claims that hold them are
# limited to 64 KiB (MAX_CLAIMS_BYTES), and only a restart (a TPM reset) empties the register.
MAX_CARRIED_LOG_BYTES = 32 * 1024
_PCR_REGISTER = re.compile(r"^pcr\.(sha256|sha384)\.(\d{1,2})$")
_DIGEST_HEX = {"sha256": 64, "sha384": 96}


@dataclass(frozen=True)
class TpmOptions:
    """How ``--platform tpm`` reaches its TPM and what it quotes."""

    tcti: str
    app_pcr: int = DEFAULT_APP_PCR
    quote_pcrs: tuple[int, ...] = ()
    key_type: str = "rsa"


def open_tpm(options: TpmOptions) -> TpmAttester:
    """A :class:`~enclave._daemon.tpm_device.TpmAttester` on ``options.tcti``; raises ``TpmDeviceError``."""
    from enclave._daemon.tpm_device import TpmAttester

    try:
        return TpmAttester(
            options.tcti, app_pcr=options.app_pcr, quote_pcrs=options.quote_pcrs, key_type=options.key_type
        )
    except ValueError as exc:
        raise ConfigError(f"--platform tpm: {exc}") from None


@dataclass(frozen=True)
class TeeOptions:
    """Where the TDX / SEV-SNP (configfs-tsm) and SGX (Gramine) attesters find their interfaces.

    ``None`` is the kernel's or Gramine's own path. ``tsm_entry`` is a report
    entry made beforehand (by an operator, or a replay in tests), used as is.
    """

    tsm_report: Path | None = None
    tsm_entry: Path | None = None
    gramine_root: Path | None = None
    # tdx, sgx: the PCS (or PCCS) the attester fetches its quotes' collateral from; None: none.
    pccs_url: str | None = None
    amd_kds: str | None = None  # sev-snp: AMD KDS base URL, to attach the certificates a report lacks
    nsm_device: Path | None = None  # nitro-enclave: the Nitro Secure Module (default /dev/nsm)
    nitro_tpm_attest: str | None = None  # nitro-tpm: AWS's tool (default: nitro-tpm-attest on PATH)


def attester_factory(
    platform: str, *, tpm: TpmOptions | None = None, tee: TeeOptions | None = None
) -> Callable[[], Attester]:
    """What opens a fresh attester for ``platform`` (once at start, again after zeroizing)."""
    if platform == sim.PLATFORM:
        return sim.SimAttester
    if platform in TSM_PLATFORMS or platform == SGX_PLATFORM:
        return lambda: _open_tee(platform, tee or TeeOptions())
    if platform in NITRO_PLATFORMS:
        options = tee or TeeOptions()
        return lambda: _open_nitro(platform, options)
    if platform == TPM_PLATFORM:
        if tpm is None:
            raise ConfigError("--platform tpm needs --tpm TCTI (e.g. device:/dev/tpmrm0)")
        return lambda: open_tpm(tpm)
    known = ", ".join(ATTESTER_PLATFORMS)
    raise ConfigError(f"no attester for platform {platform!r} (known: {known})")


def _open_tee(platform: str, options: TeeOptions) -> Attester:
    from enclave._daemon import tsm
    from enclave.collateral._http import get as http_get
    from enclave.collateral.amd_kds import AmdKds
    from enclave.collateral.cache import CollateralCache

    collateral = _intel_collateral(options.pccs_url) if platform != "sev-snp" else None
    if platform == SGX_PLATFORM:
        return tsm.GramineAttester(options.gramine_root or tsm.GRAMINE_ROOT, collateral=collateral)
    configfs = tsm.ConfigfsTsm(options.tsm_report or tsm.TSM_REPORT_ROOT, entry=options.tsm_entry)
    kds = None
    if options.amd_kds:
        # Attestation waits for this: short timeouts, and KDS left alone a while after failing.
        fetch = functools.partial(http_get, attempts=2, timeout=5.0)
        kds = AmdKds(options.amd_kds, cache=CollateralCache(None), fetch=fetch)
    return tsm.TsmAttester(platform, tsm=configfs, collateral=collateral, amd_kds=kds)


def _open_nitro(platform: str, options: TeeOptions) -> Attester:
    from enclave._daemon.nitro_attest import open_nitro

    return open_nitro(platform, nsm_device=options.nsm_device, tpm_tool=options.nitro_tpm_attest)


def _intel_collateral(pccs_url: str | None) -> CollateralSource | None:
    """The collateral source for the enclave's quotes: PCS through a cache in memory (no data directory)."""
    if pccs_url is None:
        return None
    from enclave.collateral.cache import CollateralCache
    from enclave.collateral.intel import IntelCollateral
    from enclave.collateral.intel_pcs import IntelPcs

    return IntelCollateral(CollateralCache(None), IntelPcs(pccs_url)).for_quote


def attester_for(platform: str) -> Attester:
    return attester_factory(platform)()


def reference_values(
    platform: str,
    custodian_ca_der: bytes,
    *,
    registers: Mapping[str, str] | None = None,
    tpm_app_pcr: int = DEFAULT_APP_PCR,
    tpm_ek_roots: str = "",
    allow_unmeasured_os: bool = False,
    min_tcb_evaluation_data_number: int | None = None,
) -> ReferenceValues:
    """The manifest of this build on ``platform``, trusting the given custodian CA.

    ``tpm_ek_roots`` (PEM) are checked when the manifest is parsed.

    ``registers`` are the platform's boot registers (hex) for a hardware
    platform, as read from the machine or given by its operator; the sim
    platform has fixed ones.
    """
    if platform not in ATTESTER_PLATFORMS:
        raise ConfigError(f"no manifest for platform {platform!r} (known: {', '.join(ATTESTER_PLATFORMS)})")
    if platform == sim.PLATFORM:
        if registers:
            raise ConfigError("the sim platform's registers are fixed")
        registers = _BOOT_REGISTERS[platform]
    for name, value in (registers or {}).items():
        if not name or not re.fullmatch(r"(?:[0-9a-f]{2})+", value):
            raise ConfigError(f"register {name!r} must be a name and an even number of lowercase hex digits")
    return ReferenceValues(
        platform=platform,
        allow_simulation=platform == sim.PLATFORM,
        custodian_ca_sha256=measurement.custodian_ca_sha256(custodian_ca_der),
        code_sha384=measurement.code_sha384().hex(),
        registers=dict(registers or {}),
        tpm_app_pcr=tpm_app_pcr,
        tpm_ek_roots=tpm_ek_roots,
        allow_unmeasured_os=allow_unmeasured_os,
        min_tcb_evaluation_data_number=min_tcb_evaluation_data_number,
    )


def tpm_boot_registers(
    options: TpmOptions | None, given: Mapping[str, str], *, app_pcr: int = DEFAULT_APP_PCR
) -> dict[str, str]:
    """Boot PCR reference values: read from the TPM (``options``), then the operator's ``given`` on top.

    Never the application PCR: it holds this enclave's measurement log, which
    the verifier replays instead.
    """
    registers: dict[str, str] = {}
    if options is not None:
        pcrs = tuple(p for p in options.quote_pcrs if p != options.app_pcr)
        if pcrs:
            attester = open_tpm(options)
            try:
                bank = attester.log_bank
                values = attester.read_pcrs(pcrs)
            finally:
                attester.close()
            registers.update({f"pcr.{bank}.{i}": v.hex() for i, v in sorted(values.items())})
        app_pcr = options.app_pcr
    for name, value in given.items():
        match = _PCR_REGISTER.match(name)
        if match is None or int(match[2]) > 23:
            raise ConfigError(f"--pcr-value {name!r} is not pcr.sha256.N or pcr.sha384.N (N in 0-23)")
        if int(match[2]) == app_pcr:
            raise ConfigError(f"PCR {app_pcr} is the application PCR: the measurement log pins it")
        text = value.lower()
        if len(text) != _DIGEST_HEX[match[1]] or not re.fullmatch(r"[0-9a-f]*", text):
            raise ConfigError(f"--pcr-value {name} must be {_DIGEST_HEX[match[1]] // 2} bytes of hex")
        registers[name] = text
    return registers


def parse_assignments(items: Sequence[str], flag: str) -> dict[str, str]:
    """``NAME=VALUE`` flag values as a mapping."""
    parsed: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{flag} must be NAME=HEX, got {item!r}")
        parsed[name.strip()] = value.strip().lower()
    return parsed


class MeasuredIdentity:
    """Identity key (generated in memory), attester and the log folded into it.

    The log opens with an ``instance`` event naming the key and the deployment.
    Events are folded into the platform register when evidence is next collected,
    so an instance that never attests leaves the register as it found it. On a
    platform whose register outlives the attester (a TPM PCR until the TPM
    resets), ``successor`` carries the entries folded so far into the next
    instance's log, which the verifier replays whole.
    """

    def __init__(
        self,
        attester: Attester,
        deployment: str,
        *,
        key: ec.EllipticCurvePrivateKey | None = None,
        earlier_log: Sequence[MeasurementEvent] = (),
    ) -> None:
        self.attester = attester
        self.deployment = deployment
        self.key = key if key is not None else generate_identity_key()
        self.public_key_der = public_key_der(self.key)
        if earlier_log:
            earlier = tuple(earlier_log)
            attester.continue_log({alg: replay(earlier, alg) for alg in ("sha384", "sha256")})
        self._folded: list[MeasurementEvent] = list(earlier_log)
        self._pending = [measurement.instance_event(self.public_key_der, deployment)]
        # Folding and collecting must not interleave: the log must replay to the register.
        self._lock = threading.Lock()

    @property
    def platform(self) -> str:
        return self.attester.platform

    @property
    def log(self) -> tuple[MeasurementEvent, ...]:
        with self._lock:
            return (*self._folded, *self._pending)

    def measure(self, event: MeasurementEvent) -> None:
        """Append ``event`` to the log; it is in the platform register before any evidence is."""
        with self._lock:
            self._pending.append(event)
        logger.info("measured %s %s", event.kind, event.sha384.hex())

    def attest(self, purpose: str, nonce: bytes) -> tuple[bytes, bytes]:
        """Fresh evidence over claims for ``purpose`` and ``nonce``: (evidence, claims) bytes."""
        with self._lock:
            self._fold()
            claims = self._claims(purpose, nonce)
            evidence = self.attester.collect(claims.report_data())
        return evidence.to_bytes(), claims.to_bytes()

    def successor(self, attester: Attester) -> MeasuredIdentity:
        """The next instance's identity on ``attester``: a new key, and the register's log so far."""
        earlier: tuple[MeasurementEvent, ...] = ()
        if attester.register_outlives_attester:
            with self._lock:
                earlier = tuple(self._folded)
            size = len(canonical_json([e.to_json() for e in earlier]))
            if size > MAX_CARRIED_LOG_BYTES:
                raise ConfigError(
                    f"the measurement log since the {attester.platform} register's reset is {size} bytes, "
                    f"over the {MAX_CARRIED_LOG_BYTES} a new instance can carry; restart the machine"
                )
        return MeasuredIdentity(attester, self.deployment, earlier_log=earlier)

    def _fold(self) -> None:
        while self._pending:
            self.attester.extend(self._pending[0].digests())
            self._folded.append(self._pending.pop(0))

    def _claims(self, purpose: str, nonce: bytes) -> AttestedClaims:
        return AttestedClaims(
            nonce=nonce,
            public_key=self.public_key_der,
            deployment=self.deployment,
            platform=self.attester.platform,
            purpose=purpose,
            log=tuple(self._folded),
        )
