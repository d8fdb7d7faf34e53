"""``enclave``: write the manifest of this build, or serve a lent model.

    enclave manifest --platform sim --custodian-ca ca.pem --out manifest.toml
    enclave manifest --platform tpm --custodian-ca ca.pem --tpm TCTI [--tpm-quote-pcrs 0-7] \\
                     [--pcr-value pcr.sha256.0=HEX ...] --out manifest.toml
    enclave serve --custodian HOST:PORT --custodian-ca ca.pem --deployment NAME \\
                  --token TOKEN --listen HOST:PORT [--metrics HOST:PORT] [--ready-file PATH] \\
                  [--platform tpm --tpm TCTI [--tpm-pcr 15] [--tpm-quote-pcrs 0-7] [--tpm-key rsa|ecc]]

Every flag defaults from an ``ENCLAVE_*`` environment variable (prefer
``ENCLAVE_TOKEN`` to ``--token``: flags show in the process list).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from enclave._daemon.config import DaemonConfig, custodian_ca_der
from enclave._daemon.daemon import Daemon, Ready
from enclave._daemon.errors import ConfigError
from enclave._daemon.measured import (
    ATTESTER_PLATFORMS,
    SGX_PLATFORM,
    TPM_PLATFORM,
    TSM_PLATFORMS,
    TeeOptions,
    TpmOptions,
    attester_factory,
    parse_assignments,
    reference_values,
    tpm_boot_registers,
)
from enclave.attestation import ReferenceValues
from enclave.attestation.sim import SIMULATION_WARNING
from enclave.attestation.tpm import DEFAULT_APP_PCR
from enclave.collateral._http import check_base_url
from enclave.collateral.amd_kds import DEFAULT_KDS_URL
from enclave.errors import EnclaveError

logger = logging.getLogger("enclave")

_ENV = {
    "custodian": "ENCLAVE_CUSTODIAN",
    "custodian_ca": "ENCLAVE_CUSTODIAN_CA",
    "deployment": "ENCLAVE_DEPLOYMENT",
    "token": "ENCLAVE_TOKEN",
    "listen": "ENCLAVE_LISTEN",
    "platform": "ENCLAVE_PLATFORM",
    "metrics": "ENCLAVE_METRICS",
    "ready_file": "ENCLAVE_READY_FILE",
    "tpm": "ENCLAVE_TPM",
}
_TPM_KEY_TYPES = ("rsa", "ecc")


def _env_flag(parser: argparse._ActionsContainer, flag: str, *, required: bool, **kwargs: object) -> None:
    """A flag that defaults from its environment variable, required only when that is unset too."""
    dest = flag.lstrip("-").replace("-", "_")
    env = _ENV[dest]
    default = os.environ.get(env) or kwargs.pop("default", None)
    help_text = f"{kwargs.pop('help')} (env {env})"
    parser.add_argument(
        flag,
        default=default,
        required=required and default is None,
        help=help_text,
        **kwargs,  # type: ignore[arg-type]
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks on errors")
    common.add_argument("--json", action="store_true", help="print the result as JSON")

    parser = argparse.ArgumentParser(
        prog="enclave",
        description="Custos enclave daemon: serve a lent ONNX model inside a TEE, metered by its custodian.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    manifest = commands.add_parser(
        "manifest",
        parents=[common],
        help="write the reference values (manifest) of this enclave build",
        description="Write the manifest (reference values, TOML) that the custodian approves for a "
        "deployment and that end users check this enclave against.",
    )
    _env_flag(
        manifest,
        "--platform",
        required=False,
        default="sim",
        choices=ATTESTER_PLATFORMS,
        help="attestation platform",
    )
    _env_flag(
        manifest,
        "--custodian-ca",
        required=True,
        metavar="FILE",
        help="custodian TLS CA certificate (PEM) the enclave will pin",
    )
    manifest.add_argument("--out", required=True, metavar="FILE", help="where to write the manifest")
    _tpm_flags(manifest, serve=False)
    manifest.add_argument(
        "--register",
        action="append",
        default=[],
        metavar="NAME=HEX",
        help="tdx, sev-snp, sgx: a register's reference value (e.g. mrtd=..., measurement=..., "
        "mrenclave=...), as the operator measured it; repeatable",
    )

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="enrol with the custodian and serve the model",
        description="Enrol with the custodian, fetch and decrypt the model in memory, and serve it over "
        "attested TLS, reserving one unit of quota per inference. SIGTERM or SIGINT stops taking calls "
        "and sends the final usage report.",
    )
    _env_flag(
        serve, "--custodian", required=True, metavar="HOST:PORT", help="the custodian's enrolment listener"
    )
    _env_flag(
        serve,
        "--custodian-ca",
        required=True,
        metavar="FILE",
        help="custodian TLS CA certificate (PEM), pinned and measured",
    )
    _env_flag(serve, "--deployment", required=True, metavar="NAME", help="deployment to serve")
    _env_flag(serve, "--token", required=True, metavar="TOKEN", help="the deployment's join token")
    _env_flag(
        serve,
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="inference endpoint (port 0 picks a free port)",
    )
    _env_flag(
        serve,
        "--platform",
        required=False,
        default="sim",
        choices=ATTESTER_PLATFORMS,
        help="attestation platform",
    )
    _env_flag(serve, "--metrics", required=False, metavar="HOST:PORT", help="Prometheus metrics endpoint")
    _env_flag(
        serve,
        "--ready-file",
        required=False,
        metavar="PATH",
        help="written (atomically, JSON) once serving: bound addresses, instance id, model hash",
    )
    _tpm_flags(serve, serve=True)
    tee = serve.add_argument_group("platforms tdx, sev-snp, sgx")
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
    return parser


def _tee_options(args: argparse.Namespace) -> TeeOptions | None:
    given = args.tsm_report or args.tsm_entry or args.gramine_root
    if args.platform in TSM_PLATFORMS:
        if args.gramine_root:
            raise ConfigError("--gramine-root is for --platform sgx")
    elif args.platform == SGX_PLATFORM:
        if args.tsm_report or args.tsm_entry:
            raise ConfigError("--tsm-report and --tsm-entry are for --platform tdx or sev-snp")
    elif given:
        raise ConfigError("--tsm-report, --tsm-entry and --gramine-root are for tdx, sev-snp and sgx")
    if args.amd_kds is not None and args.platform != "sev-snp":
        raise ConfigError("--amd-kds is for --platform sev-snp")
    return TeeOptions(
        tsm_report=args.tsm_report,
        tsm_entry=args.tsm_entry,
        gramine_root=args.gramine_root,
        amd_kds=_kds_url(args.amd_kds) if args.platform == "sev-snp" else None,
    )


def _kds_url(url: str | None) -> str | None:
    if url == "off":
        return None
    try:
        return check_base_url(url or DEFAULT_KDS_URL)
    except ValueError as exc:
        raise ConfigError(f"--amd-kds: {exc}") from None


def _tpm_flags(parser: argparse.ArgumentParser, *, serve: bool) -> None:
    group = parser.add_argument_group("platform tpm")
    _env_flag(
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
        help=f"application PCR the measurement log is extended into (default {DEFAULT_APP_PCR})",
    )
    if serve:
        group.add_argument(
            "--tpm-key", choices=_TPM_KEY_TYPES, default="rsa", help="EK and AK key type (default rsa)"
        )
    group.add_argument(
        "--tpm-quote-pcrs",
        default="",
        metavar="LIST",
        help="boot PCRs quoted besides the application PCR, e.g. 0-7 or 0,2,4-7",
    )
    if not serve:
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


def _tpm_options(args: argparse.Namespace, *, serve: bool) -> TpmOptions | None:
    if args.platform != TPM_PLATFORM:
        if args.tpm or args.tpm_quote_pcrs or (not serve and (args.pcr_value or args.tpm_ek_roots)):
            raise ConfigError("the --tpm flags are for --platform tpm")
        return None
    from enclave._daemon.tpm_device import parse_pcr_list

    try:
        quote_pcrs = parse_pcr_list(args.tpm_quote_pcrs)
    except ValueError as exc:
        raise ConfigError(f"--tpm-quote-pcrs: {exc}") from None
    if args.tpm is None:
        if serve or not args.pcr_value:
            raise ConfigError("--platform tpm needs --tpm TCTI" + ("" if serve else " or --pcr-value"))
        return None
    if serve:
        return TpmOptions(args.tpm, app_pcr=args.tpm_pcr, quote_pcrs=quote_pcrs, key_type=args.tpm_key)
    return TpmOptions(args.tpm, app_pcr=args.tpm_pcr, quote_pcrs=quote_pcrs)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "manifest":
            return _manifest(args)
        return _serve(args)
    except EnclaveError as exc:
        if args.verbose:
            logger.exception("failed")
        print(
            f"enclave: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr
        )
        return 1


def _manifest(args: argparse.Namespace) -> int:
    ca_der = custodian_ca_der(_read(args.custodian_ca, "--custodian-ca"))
    registers = None
    ek_roots = ""
    if args.platform == TPM_PLATFORM:
        given = parse_assignments(args.pcr_value, "--pcr-value")
        registers = tpm_boot_registers(_tpm_options(args, serve=False), given, app_pcr=args.tpm_pcr)
        if args.tpm_ek_roots:
            ek_roots = _read(args.tpm_ek_roots, "--tpm-ek-roots").decode(errors="replace")
        else:
            print(
                "warning: no --tpm-ek-roots: the custodian will refuse to enrol this enclave", file=sys.stderr
            )
    else:
        _tpm_options(args, serve=False)
    if args.register and args.platform not in (*TSM_PLATFORMS, SGX_PLATFORM):
        raise ConfigError("--register is for --platform tdx, sev-snp or sgx")
    if args.platform in (*TSM_PLATFORMS, SGX_PLATFORM):
        registers = parse_assignments(args.register, "--register")
    reference = reference_values(
        args.platform, ca_der, registers=registers, tpm_app_pcr=args.tpm_pcr, tpm_ek_roots=ek_roots
    )
    reference = ReferenceValues.from_toml(reference.to_toml())  # what the custodian will read
    _write_atomically(Path(args.out), reference.to_toml().encode())
    if reference.allow_simulation:
        print(f"SIMULATION: this manifest allows simulated evidence. {SIMULATION_WARNING}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "manifest": args.out,
                    "platform": reference.platform,
                    "allow_simulation": reference.allow_simulation,
                    "custodian_ca_sha256": reference.custodian_ca_sha256,
                    "code_sha384": reference.code_sha384,
                    "registers": dict(reference.registers),
                }
            )
        )
    else:
        print(f"wrote manifest for platform {reference.platform} to {args.out}")
        print(f"  code SHA-384:        {reference.code_sha384}")
        print(f"  custodian CA SHA-256: {reference.custodian_ca_sha256}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Pillow warns before it refuses an oversized image; in the daemon that is a refusal at once.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    config = DaemonConfig(
        custodian=args.custodian,
        custodian_ca_pem=_read(args.custodian_ca, "--custodian-ca"),
        deployment=args.deployment,
        join_token=args.token,
        listen=args.listen,
        platform=args.platform,
        metrics_listen=args.metrics,
        ready_file=Path(args.ready_file) if args.ready_file else None,
    )
    new_attester = attester_factory(
        config.platform, tpm=_tpm_options(args, serve=True), tee=_tee_options(args)
    )
    attester = new_attester()
    if attester.simulated:
        print(f"WARNING: SIMULATION. {SIMULATION_WARNING}", file=sys.stderr, flush=True)

    def on_ready(ready: Ready) -> None:
        if config.ready_file is not None:
            _write_atomically(config.ready_file, json.dumps(ready.to_json()).encode())
        if args.json:
            print(json.dumps(ready.to_json()), flush=True)
        else:
            print(
                f"enclave serving on {ready.inference} "
                f"(deployment {ready.deployment}, model SHA384 {ready.model_sha384})",
                flush=True,
            )

    asyncio.run(_run(Daemon(config, attester, on_ready=on_ready, new_attester=new_attester)))
    return 0


async def _run(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, daemon.request_stop)
    try:
        await daemon.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} {path}: {exc.strerror}") from None


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        with tempfile.NamedTemporaryFile(
            dir=path.parent or ".", prefix=f".{path.name}.", delete=False
        ) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
