"""The ``--platform tpm`` flags of the ``enclave`` command: what they mean, and what they are checked for."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from enclave._daemon.boot_chain import pinned_components, read_event_log
from enclave._daemon.env_flags import env_flag
from enclave._daemon.errors import ConfigError, UsageError
from enclave._daemon.measured import (
    DEFAULT_QUOTE_PCRS,
    TPM_PLATFORM,
    TpmOptions,
    parse_assignments,
    tpm_boot_registers,
)
from enclave.attestation import ReferenceValues
from enclave.attestation.tpm import DEFAULT_APP_PCR

_TPM_KEY_TYPES = ("rsa", "ecc")


def add_tpm_flags(parser: argparse.ArgumentParser, *, serve: bool) -> None:
    """The tpm flags of ``enclave serve`` (``serve``) or ``enclave manifest``, in a group of their own."""
    group = parser.add_argument_group("platform tpm")
    env_flag(
        group,
        "--tpm",
        required=False,
        metavar="TCTI",
        help="the TPM, as a TCTI string: device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321, mssim:...",
    )
    group.add_argument(
        "--tpm-pcr",
        type=int,
        default=DEFAULT_APP_PCR,
        metavar="N",
        help=f"application PCR the measurement log is extended into, 0 to 23 (default {DEFAULT_APP_PCR})",
    )
    if serve:
        group.add_argument(
            "--tpm-key", choices=_TPM_KEY_TYPES, default="rsa", help="EK and AK key type (default rsa)"
        )
    group.add_argument(
        "--tpm-quote-pcrs",
        metavar="LIST",
        help=f"boot PCRs quoted besides the application PCR (default {DEFAULT_QUOTE_PCRS}: the classic "
        "and the UKI boot chains up to the OS)",
    )
    if not serve:
        _add_manifest_tpm_flags(group)


def _add_manifest_tpm_flags(group: argparse._ArgumentGroup) -> None:
    """The tpm flags only ``enclave manifest`` takes."""
    group.add_argument(
        "--pcr-value",
        action="append",
        default=[],
        metavar="pcr.BANK.N=HEX",
        help="a boot PCR's reference value, instead of (or besides) reading it from --tpm; repeatable",
    )
    group.add_argument(
        "--tpm-ek-roots",
        metavar="FILE",
        help="CA certificates (PEM) that the TPM's EK certificate must chain to; without them the "
        "custodian refuses to enrol the enclave",
    )
    group.add_argument(
        "--event-log",
        type=Path,
        metavar="FILE",
        help="the TCG event log (/sys/kernel/security/tpm0/binary_bios_measurements): check that it "
        "replays to the pinned PCRs and show what each holds",
    )
    group.add_argument(
        "--allow-unmeasured-os",
        action="store_true",
        help="write a manifest pinning no boot chain up to the OS (anyone with root can take the model)",
    )


def tpm_options(args: argparse.Namespace, *, serve: bool) -> TpmOptions | None:
    """How to reach the TPM and what to quote; ``None`` off the tpm platform (or with only --pcr-value)."""
    if args.platform != TPM_PLATFORM:
        manifest_only = not serve and (
            args.pcr_value or args.tpm_ek_roots or args.event_log or args.allow_unmeasured_os
        )
        if args.tpm or args.tpm_quote_pcrs is not None or manifest_only:
            raise UsageError("the --tpm flags are for --platform tpm")
        return None
    from enclave._daemon.tpm_device import parse_pcr_list

    try:
        quote_pcrs = parse_pcr_list(
            DEFAULT_QUOTE_PCRS if args.tpm_quote_pcrs is None else args.tpm_quote_pcrs
        )
    except ValueError as exc:
        raise UsageError(f"--tpm-quote-pcrs: {exc}") from None
    if args.tpm is None:
        if serve or not args.pcr_value:
            raise UsageError("--platform tpm needs --tpm TCTI" + ("" if serve else " or --pcr-value"))
        return None
    if serve:
        return TpmOptions(args.tpm, app_pcr=args.tpm_pcr, quote_pcrs=quote_pcrs, key_type=args.tpm_key)
    return TpmOptions(args.tpm, app_pcr=args.tpm_pcr, quote_pcrs=quote_pcrs)


def tpm_manifest_inputs(args: argparse.Namespace) -> tuple[dict[str, str], str]:
    """The boot PCR values (read from --tpm, then --pcr-value) and the EK roots (PEM) of a tpm manifest."""
    given = parse_assignments(args.pcr_value, "--pcr-value")
    registers = tpm_boot_registers(tpm_options(args, serve=False), given, app_pcr=args.tpm_pcr)
    if not args.tpm_ek_roots:
        print("warning: no --tpm-ek-roots: the custodian will refuse to enrol this enclave", file=sys.stderr)
        return registers, ""
    try:
        ek_roots = Path(args.tpm_ek_roots).read_bytes().decode(errors="replace")
    except OSError as exc:
        raise ConfigError(f"cannot read --tpm-ek-roots {args.tpm_ek_roots}: {exc.strerror}") from None
    return registers, ek_roots


def boot_chain_of(args: argparse.Namespace, reference: ReferenceValues) -> dict[str, list[str]]:
    """With --event-log: what each pinned PCR holds, after checking the log replays to them."""
    if reference.platform != TPM_PLATFORM or args.event_log is None:
        return {}
    return pinned_components(read_event_log(args.event_log), reference.registers)
