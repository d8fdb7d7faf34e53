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
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from enclave._daemon.boot_chain import components_text
from enclave._daemon.config import DaemonConfig, custodian_ca_der
from enclave._daemon.daemon import Daemon, Ready
from enclave._daemon.env_flags import env_flag
from enclave._daemon.errors import ConfigError, UsageError
from enclave._daemon.hardening import protect_process
from enclave._daemon.measured import (
    ATTESTER_PLATFORMS,
    REGISTER_PLATFORMS,
    TPM_PLATFORM,
    attester_factory,
    parse_assignments,
    reference_values,
)
from enclave._daemon.tee_flags import add_tee_flags, evaluation_number, tee_options
from enclave._daemon.tpm_flags import add_tpm_flags, boot_chain_of, tpm_manifest_inputs, tpm_options
from enclave.attestation import ReferenceValues
from enclave.attestation.manifest import DCAP_PLATFORMS, UNMEASURED_OS_WARNING
from enclave.attestation.sim import SIMULATION_WARNING
from enclave.errors import EnclaveError

logger = logging.getLogger("enclave")


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
    env_flag(
        manifest,
        "--platform",
        required=False,
        default="sim",
        choices=ATTESTER_PLATFORMS,
        help="attestation platform",
    )
    env_flag(
        manifest,
        "--custodian-ca",
        required=True,
        metavar="FILE",
        help="custodian TLS CA certificate (PEM) the enclave will pin",
    )
    manifest.add_argument("--out", required=True, metavar="FILE", help="where to write the manifest")
    add_tpm_flags(manifest, serve=False)
    manifest.set_defaults(usage=manifest.format_usage)
    manifest.add_argument(
        "--register",
        action="append",
        default=[],
        metavar="NAME=HEX",
        help="tdx, sev-snp, sgx, nitro-enclave, nitro-tpm: a register's reference value (e.g. mrtd=...,"
        " measurement=..., mrenclave=..., pcr0=...), as the operator measured it; repeatable",
    )
    manifest.add_argument(
        "--min-tcb-evaluation-data-number",
        type=evaluation_number,
        metavar="N",
        help="tdx, sgx: refuse TCB info and QE identity from an earlier TCB evaluation than N"
        " (1 to 4294967295), so that old but unexpired collateral cannot hide a TCB recovery",
    )

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="enrol with the custodian and serve the model",
        description="Enrol with the custodian, fetch and decrypt the model in memory, and serve it over "
        "attested TLS, reserving one unit of quota per inference. SIGTERM or SIGINT stops taking calls "
        "and sends the final usage report.",
    )
    env_flag(
        serve,
        "--custodian",
        required=True,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the custodian's enrolment listener; several, separated by commas, for its replicas"
        " (tried in order; the link moves to the next when its replica goes away)",
    )
    env_flag(
        serve,
        "--custodian-ca",
        required=True,
        metavar="FILE",
        help="custodian TLS CA certificate (PEM), pinned and measured",
    )
    env_flag(serve, "--deployment", required=True, metavar="NAME", help="deployment to serve")
    env_flag(serve, "--token", required=True, metavar="TOKEN", help="the deployment's join token")
    env_flag(
        serve,
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="inference endpoint, bound before enrolling; port 0 to 65535, 0 picks a free one; "
        "a port in use is an error",
    )
    env_flag(
        serve,
        "--platform",
        required=True,
        choices=ATTESTER_PLATFORMS,
        help="attestation platform, required (sim is for development only: it proves nothing)",
    )
    env_flag(
        serve,
        "--metrics",
        required=False,
        metavar="HOST:PORT",
        help="Prometheus metrics endpoint (default: none)",
    )
    env_flag(
        serve,
        "--ready-file",
        required=False,
        metavar="PATH",
        help="written (atomically, JSON) once serving: bound addresses, instance id, model hash; "
        "removed on exit (default: none)",
    )
    env_flag(
        serve,
        "--generation-streams",
        required=False,
        metavar="N",
        type=_count(1, 256),
        default="2",
        help="language models: generations run at once, each with its own thread and cache, 1 to 256 "
        "(default 2)",
    )
    env_flag(
        serve,
        "--generation-queue",
        required=False,
        metavar="N",
        type=_count(0, 4096),
        default="16",
        help="language models: generations that wait for one of those, in order, 0 to 4096; past "
        "them a generation is refused RESOURCE_EXHAUSTED, busy (default 16)",
    )
    add_tpm_flags(serve, serve=True)
    serve.set_defaults(usage=serve.format_usage)
    add_tee_flags(serve)
    return parser


def _count(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, got {text!r}")
        return int(text)

    return parse


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
        tpm_options(args, serve=False)
    if args.register and args.platform not in REGISTER_PLATFORMS:
        raise UsageError(f"--register is for --platform {', '.join(REGISTER_PLATFORMS)}")
    if args.platform in REGISTER_PLATFORMS:
        registers = parse_assignments(args.register, "--register")
    if args.min_tcb_evaluation_data_number is not None and args.platform not in DCAP_PLATFORMS:
        raise UsageError("--min-tcb-evaluation-data-number is for --platform tdx or sgx")
    reference = reference_values(
        args.platform,
        ca_der,
        registers=registers,
        tpm_app_pcr=args.tpm_pcr,
        tpm_ek_roots=ek_roots,
        allow_unmeasured_os=args.platform == TPM_PLATFORM and args.allow_unmeasured_os,
        min_tcb_evaluation_data_number=args.min_tcb_evaluation_data_number,
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
                    "min_tcb_evaluation_data_number": reference.min_tcb_evaluation_data_number,
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
        generation_streams=args.generation_streams,
        generation_waiting=args.generation_queue,
    )
    new_attester = attester_factory(config.platform, tpm=tpm_options(args, serve=True), tee=tee_options(args))
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
