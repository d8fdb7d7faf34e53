"""The tdx, sev-snp and sgx flags of ``enclave serve``: what they mean, and what they are checked for."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from enclave._daemon.env_flags import env_flag
from enclave._daemon.errors import UsageError
from enclave._daemon.measured import NITRO_PLATFORMS, SGX_PLATFORM, TSM_PLATFORMS, TeeOptions
from enclave.collateral._http import check_base_url
from enclave.collateral.amd_kds import DEFAULT_KDS_URL
from enclave.collateral.intel_pcs import INTEL_PCS_URL, pccs_argument


def add_tee_flags(parser: argparse.ArgumentParser) -> None:
    """The tdx, sev-snp and sgx flags, in a group of their own."""
    tee = parser.add_argument_group("platforms tdx, sev-snp, sgx")
    tee.add_argument(
        "--tsm-report",
        type=Path,
        metavar="DIR",
        help="tdx, sev-snp: the configfs-tsm report directory (default /sys/kernel/config/tsm/report)",
    )
    tee.add_argument(
        "--tsm-entry",
        type=Path,
        metavar="DIR",
        help="tdx, sev-snp: use this configfs-tsm report entry as it is instead of making one",
    )
    tee.add_argument(
        "--amd-kds",
        metavar="URL",
        default=os.environ.get("ENCLAVE_AMD_KDS") or None,
        help="sev-snp: the AMD KDS to fetch the VCEK and chain from when the report carries no"
        " certificates, and the CRL; 'off' attaches nothing"
        f" (env ENCLAVE_AMD_KDS; default {DEFAULT_KDS_URL})",
    )
    tee.add_argument(
        "--gramine-root",
        type=Path,
        metavar="DIR",
        help="sgx: Gramine's attestation interface (default /dev/attestation)",
    )
    env_flag(
        tee,
        "--pccs",
        required=False,
        default=INTEL_PCS_URL,
        type=pccs_argument,
        metavar="URL|off",
        help="tdx, sgx: the Intel PCS or a PCCS whose collateral the evidence carries (default Intel's)",
    )
    nitro = parser.add_argument_group("platforms nitro-enclave, nitro-tpm (AWS)")
    nitro.add_argument(
        "--nsm-device",
        type=Path,
        metavar="PATH",
        help="nitro-enclave: the Nitro Secure Module device (default /dev/nsm)",
    )
    nitro.add_argument(
        "--nitro-tpm-attest",
        metavar="PATH",
        help="nitro-tpm: AWS's nitro-tpm-attest tool (default: nitro-tpm-attest on PATH)",
    )


def tee_options(args: argparse.Namespace) -> TeeOptions | None:
    """Where the tdx, sev-snp and sgx attesters find their interfaces; each flag only on its platforms."""
    given = args.tsm_report or args.tsm_entry or args.gramine_root
    if args.platform in NITRO_PLATFORMS and given:
        raise UsageError("--tsm-report, --tsm-entry and --gramine-root are for tdx, sev-snp and sgx")
    if args.platform in TSM_PLATFORMS:
        if args.gramine_root:
            raise UsageError("--gramine-root is for --platform sgx")
    elif args.platform == SGX_PLATFORM:
        if args.tsm_report or args.tsm_entry:
            raise UsageError("--tsm-report and --tsm-entry are for --platform tdx or sev-snp")
    elif given:
        raise UsageError("--tsm-report, --tsm-entry and --gramine-root are for tdx, sev-snp and sgx")
    if args.amd_kds is not None and args.platform != "sev-snp":
        raise UsageError("--amd-kds is for --platform sev-snp")
    if args.nsm_device is not None and args.platform != "nitro-enclave":
        raise UsageError("--nsm-device is for --platform nitro-enclave")
    if args.nitro_tpm_attest is not None and args.platform != "nitro-tpm":
        raise UsageError("--nitro-tpm-attest is for --platform nitro-tpm")
    return TeeOptions(
        nsm_device=args.nsm_device,
        nitro_tpm_attest=args.nitro_tpm_attest,
        tsm_report=args.tsm_report,
        tsm_entry=args.tsm_entry,
        gramine_root=args.gramine_root,
        pccs_url=args.pccs,
        amd_kds=_kds_url(args.amd_kds) if args.platform == "sev-snp" else None,
    )


def _kds_url(url: str | None) -> str | None:
    if url == "off":
        return None
    try:
        return check_base_url(url or DEFAULT_KDS_URL)
    except ValueError as exc:
        raise UsageError(f"--amd-kds: {exc}") from None


def evaluation_number(text: str) -> int:
    """``--min-tcb-evaluation-data-number``: Intel's TCB evaluation numbers are 32-bit and start at 1."""
    try:
        number = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= number <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{number} is out of range (1 to 4294967295)")
    return number
