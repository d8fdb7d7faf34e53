"""``enclave``: write the manifest of this build, or serve a lent model.

    enclave manifest --platform sim --custodian-ca ca.pem --out manifest.toml
    enclave serve --custodian HOST:PORT --custodian-ca ca.pem --deployment NAME \\
                  --token TOKEN --listen HOST:PORT [--metrics HOST:PORT] [--ready-file PATH]

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
from enclave._daemon.measured import ATTESTER_PLATFORMS, attester_for, reference_values
from enclave.attestation.sim import SIMULATION_WARNING
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
}


def _env_flag(parser: argparse.ArgumentParser, flag: str, *, required: bool, **kwargs: object) -> None:
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
    return parser


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
    reference = reference_values(args.platform, custodian_ca_der(_read(args.custodian_ca, "--custodian-ca")))
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
    attester = attester_for(config.platform)
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

    asyncio.run(_run(Daemon(config, attester, on_ready=on_ready)))
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
