"""``enclave``: write the manifest of this build, or serve a lent model.

    enclave manifest --platform sim --custodian-ca ca.pem --out manifest.toml
    enclave manifest --platform tpm --custodian-ca ca.pem --tpm TCTI [--tpm-quote-pcrs 0-7] \\
                     [--pcr-value pcr.sha256.0=HEX ...] --out manifest.toml
    enclave serve --custodian HOST:PORT --custodian-ca ca.pem --deployment NAME \\
                  --token TOKEN --listen HOST:PORT [--metrics HOST:PORT] [--ready-file PATH] \\
                  [--platform tpm --tpm TCTI [--tpm-pcr 15] [--tpm-quote-pcrs 0-7] [--tpm-key rsa|ecc]]

Every flag defaults from an ``ENCLAVE_*`` environment variable (prefer
``ENCLAVE_TOKEN`` to ``--token``: flags show in the process list). Exit status:
0 done, 1 a domain error (one line, or one JSON object with ``--json``), 2 the
command line misused. ``serve`` needs ``--platform``: simulation is never
picked by default.
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

from enclave._daemon.boot_chain import components_text
from enclave._daemon.config import DaemonConfig, custodian_ca_der
from enclave._daemon.daemon import Daemon, Ready
from enclave._daemon.errors import ConfigError, UsageError
from enclave._daemon.hardening import protect_process
from enclave._daemon.measured import (
    ATTESTER_PLATFORMS,
    DEFAULT_QUOTE_PCRS,
    SGX_PLATFORM,
    TPM_PLATFORM,
    TSM_PLATFORMS,
    TeeOptions,
    attester_factory,
    parse_assignments,
    reference_values,
)
from enclave._daemon.tpm_flags import add_manifest_tpm_flags, boot_chain_of, tpm_manifest_inputs
from enclave._daemon.tpm_flags import tpm_options as _tpm_options
from enclave.attestation import ReferenceValues
from enclave.attestation.manifest import UNMEASURED_OS_WARNING
from enclave.attestation.sim import SIMULATION_WARNING
from enclave.attestation.tpm import DEFAULT_APP_PCR
from enclave.collateral._http import check_base_url
from enclave.collateral.amd_kds import DEFAULT_KDS_URL
from enclave.collateral.intel_pcs import INTEL_PCS_URL, pccs_argument
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
    "pccs": "ENCLAVE_PCCS",
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
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="manifest (write this build's reference values) or serve (enrol and serve the model)",
    )

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
    manifest.set_defaults(usage=manifest.format_usage)
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
        help="inference endpoint, bound before enrolling; port 0 to 65535, 0 picks a free one; "
        "a port in use is an error",
    )
    _env_flag(
        serve,
        "--platform",
        required=True,
        choices=ATTESTER_PLATFORMS,
        help="attestation platform, required (sim is for development only: it proves nothing)",
    )
    _env_flag(
        serve,
        "--metrics",
        required=False,
        metavar="HOST:PORT",
        help="Prometheus metrics endpoint (default: none)",
    )
    _env_flag(
        serve,
        "--ready-file",
        required=False,
        metavar="PATH",
        help="written (atomically, JSON) once serving: bound addresses, instance id, model hash; "
        "removed on exit (default: none)",
    )
    _tpm_flags(serve, serve=True)
    serve.set_defaults(usage=serve.format_usage)
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
    _env_flag(
        tee,
        "--pccs",
        required=False,
        default=INTEL_PCS_URL,
        type=pccs_argument,
        metavar="URL|off",
        help="tdx, sgx: the Intel PCS or a PCCS whose collateral the evidence carries (default Intel's)",
    )
    return parser


def _tee_options(args: argparse.Namespace) -> TeeOptions | None:
    given = args.tsm_report or args.tsm_entry or args.gramine_root
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
    return TeeOptions(
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
        add_manifest_tpm_flags(group)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "manifest":
            return _manifest(args)
        return _serve(args)
    except UsageError as exc:
        print(args.usage(), end="", file=sys.stderr)
        print(f"enclave {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except EnclaveError as exc:
        if args.verbose:
            logger.exception("failed")
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if args.json:
            print(json.dumps({"error": type(exc).__name__, "reason": reason, "exit_code": 1}), flush=True)
        else:
            print(f"enclave: error: {reason}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (``| head``): nothing left to say to it, and no traceback about it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _manifest(args: argparse.Namespace) -> int:
    ca_der = custodian_ca_der(_read(args.custodian_ca, "--custodian-ca"))
    registers = None
    ek_roots = ""
    if args.platform == TPM_PLATFORM:
        registers, ek_roots = tpm_manifest_inputs(args)
    else:
        _tpm_options(args, serve=False)
    if args.register and args.platform not in (*TSM_PLATFORMS, SGX_PLATFORM):
        raise UsageError("--register is for --platform tdx, sev-snp or sgx")
    if args.platform in (*TSM_PLATFORMS, SGX_PLATFORM):
        registers = parse_assignments(args.register, "--register")
    reference = reference_values(
        args.platform,
        ca_der,
        registers=registers,
        tpm_app_pcr=args.tpm_pcr,
        tpm_ek_roots=ek_roots,
        allow_unmeasured_os=args.platform == TPM_PLATFORM and args.allow_unmeasured_os,
    )
    reference = ReferenceValues.from_toml(reference.to_toml())  # what the custodian will read
    boot_chain = boot_chain_of(args, reference)
    _write_atomically(Path(args.out), reference.to_toml().encode())
    if reference.allow_simulation:
        print(f"SIMULATION: this manifest allows simulated evidence. {SIMULATION_WARNING}", file=sys.stderr)
    if reference.allow_unmeasured_os:
        print(f"WARNING: {UNMEASURED_OS_WARNING}", file=sys.stderr)
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
                    "allow_unmeasured_os": reference.allow_unmeasured_os,
                    "boot_chain": boot_chain,
                }
            )
        )
    else:
        print(f"wrote manifest for platform {reference.platform} to {args.out}")
        print(f"  code SHA-384:        {reference.code_sha384}")
        print(f"  custodian CA SHA-256: {reference.custodian_ca_sha256}")
        if boot_chain:
            print(components_text(boot_chain))
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Before any secret exists in this process: no core dumps, no ptrace attach, no swap if allowed.
    protect_process()
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

    try:
        asyncio.run(_run(Daemon(config, attester, on_ready=on_ready, new_attester=new_attester)))
    finally:
        # Whoever waits on the ready file must not take a stopped daemon for a serving one.
        if config.ready_file is not None:
            config.ready_file.unlink(missing_ok=True)
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
