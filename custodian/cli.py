"""``custodian``: run the custodian server and administer it from the console.

Exit status: 0 on success, 1 when the custodian refuses or fails (one line on
stderr, or a JSON object on stdout with ``--json``; the traceback with
``--verbose``), 2 when the arguments are wrong, 141 when stdout's reader went
away (``| head``).
"""

from __future__ import annotations

import os

# gRPC's C core reads this once, when grpc is first imported. Without it a refused TLS handshake
# prints raw C-core lines beside the one line that says what went wrong; GRPC_VERBOSITY=ERROR
# in the environment brings them back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse
import asyncio
import hashlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import Message

from custodian import _cli_args as arg
from custodian._cli_admin import (
    add_admin_cert_command,
    add_remote_options,
    check_remote_options,
    console_for,
)
from custodian._cli_audit import add_audit_commands, emit
from custodian._cli_console import add_console_commands, add_console_option
from custodian._cli_deployment import add_deployment_commands
from custodian._cli_model import add_model_commands
from custodian._cli_output import ConsoleParser, failure, plain, reader_gone, table
from custodian._cli_replica import add_replica_commands, add_serve_options, check_serve_options
from custodian.config import (
    MAX_GRANT_UNITS,
    CustodianConfig,
)
from custodian.console import Console
from custodian.errors import CustodianError
from custodian.server import CustodianServer
from enclave.collateral._http import service_url_argument
from enclave.collateral.amd_kds import DEFAULT_KDS_URL
from enclave.collateral.intel_pcs import INTEL_PCS_URL, pccs_argument
from enclave.errors import EnclaveError

logger = logging.getLogger("custodian")

DEFAULT_DATA = "custodian-data"


def _global_options(parser: argparse.ArgumentParser, *, here: bool) -> None:
    """--data, --json and --verbose, accepted before and after the command.

    Only the top-level parser holds their defaults: a subcommand parser's default
    would overwrite a value given before the command.
    """
    data_default: object = Path(os.environ.get("CUSTODIAN_DATA", DEFAULT_DATA)) if here else argparse.SUPPRESS
    flag_default: object = False if here else argparse.SUPPRESS
    parser.add_argument(
        "--data",
        type=Path,
        default=data_default,
        help="data directory: keys, ledger, sealed models, admin socket"
        f" (env CUSTODIAN_DATA; default {DEFAULT_DATA})",
    )
    parser.add_argument(
        "--json", action="store_true", default=flag_default, help="print machine-readable JSON"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=flag_default,
        help="debug logging and tracebacks on errors",
    )
    add_remote_options(parser, here=here)


_USAGE_EPILOG = """\
columns: BALANCE free units; LEASED held by active leases, not used yet; USED proven by
receipts; UNREPORTED charged for leases that expired without a final receipt; REVOKED
taken back; OVERDRAWN served past a cut lease beyond what the balance covered;
GRANTED_TOTAL every unit ever granted, so that GRANTED_TOTAL + OVERDRAWN = BALANCE +
LEASED + USED + UNREPORTED + REVOKED; INSTANCES enclaves holding an active lease (an
instance that stopped, or whose lease expired, is not counted; `custodian enclaves`
lists them all)."""


def _parser() -> argparse.ArgumentParser:
    common = ConsoleParser(add_help=False)
    _global_options(common, here=False)

    parser = ConsoleParser(
        prog="custodian",
        description="Lend an ONNX model to attested enclaves and meter every inference.",
        epilog="Run `custodian serve` first; the other commands talk to it over DATA/admin.sock"
        " (or over --admin HOST:PORT). Exit status: 0 done, 1 refused or failed, 2 misuse.",
    )
    _global_options(parser, here=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the custodian server")
    serve.add_argument(
        "--listen",
        type=arg.address,
        default=os.environ.get("CUSTODIAN_LISTEN", "127.0.0.1:7443"),
        help="enrolment listener, TLS (env CUSTODIAN_LISTEN; default %(default)s)",
    )
    serve.add_argument(
        "--mtls-listen",
        type=arg.address,
        default=os.environ.get("CUSTODIAN_MTLS_LISTEN") or None,
        help="gateway listener, mutual TLS (env CUSTODIAN_MTLS_LISTEN; default: the --listen host, PORT+1)",
    )
    serve.add_argument(
        "--metrics",
        type=arg.address,
        default=os.environ.get("CUSTODIAN_METRICS") or None,
        help="Prometheus metrics over HTTP, HOST:PORT (env CUSTODIAN_METRICS; default: off)",
    )
    serve.add_argument(
        "--admin-listen",
        type=arg.address,
        default=os.environ.get("CUSTODIAN_ADMIN_LISTEN") or None,
        help="admin API over TCP, mutual TLS with `custodian admin-cert` certificates"
        " (env CUSTODIAN_ADMIN_LISTEN; default: the unix socket only)",
    )
    serve.add_argument(
        "--pccs",
        type=pccs_argument,
        default=os.environ.get("CUSTODIAN_PCCS") or INTEL_PCS_URL,
        metavar="URL|off",
        help="Intel PCS or PCCS for tdx/sgx collateral, cached in DATA/collateral/intel"
        " (env CUSTODIAN_PCCS; default Intel's)",
    )
    serve.add_argument(
        "--collateral-dir",
        type=Path,
        default=os.environ.get("CUSTODIAN_COLLATERAL_DIR") or None,
        metavar="DIR",
        help="air-gapped: read Intel collateral from DIR as the service returns it, never fetch"
        " (env CUSTODIAN_COLLATERAL_DIR)",
    )
    serve.add_argument(
        "--amd-kds",
        metavar="URL|off",
        type=service_url_argument,
        default=os.environ.get("CUSTODIAN_AMD_KDS") or DEFAULT_KDS_URL,
        help="AMD KDS for SEV-SNP enrolments: the VCEK and chain a report lacks, and the CRL, cached"
        " under DATA/collateral/amd; 'off' uses only what the evidence carries"
        " (env CUSTODIAN_AMD_KDS; default %(default)s)",
    )
    add_serve_options(serve)
    add_console_option(serve)
    serve.set_defaults(run=_serve)

    commands.add_parser(
        "ca", parents=[common], help="print the custodian TLS CA (PEM) that enclaves pin and manifests name"
    ).set_defaults(run=_ca)

    add_model_commands(commands, common)
    add_deployment_commands(commands, common)

    units = f"1 to {MAX_GRANT_UNITS}"
    grant = commands.add_parser("grant", parents=[common], help="add inference units to a deployment")
    grant.add_argument("deployment", help="the deployment")
    grant.add_argument("units", type=arg.units, help=f"units to add to its balance, {units}")
    grant.set_defaults(run=_grant)
    revoke = commands.add_parser(
        "revoke", parents=[common], help="take units back: the free balance first, then the enclaves' leases"
    )
    revoke.add_argument("deployment", help="the deployment")
    revoke.add_argument("units", type=arg.units, nargs="?", help=f"how many, {units} (or --all)")
    revoke.add_argument("--all", action="store_true", help="take back every unit not used yet")
    revoke.set_defaults(run=_revoke)
    for name, run, text in (
        ("suspend", _suspend, "stop every enclave of a deployment at once"),
        ("resume", _resume, "let a suspended deployment serve again"),
    ):
        sub = commands.add_parser(name, parents=[common], help=text)
        sub.add_argument("deployment", help="the deployment")
        sub.set_defaults(run=run)

    usage = commands.add_parser(
        "usage",
        parents=[common],
        help="quota and usage per deployment",
        epilog=_USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    usage.add_argument("deployment", nargs="?", default="", help="only this deployment (default: all)")
    usage.set_defaults(run=_usage)
    enclaves = commands.add_parser("enclaves", parents=[common], help="enrolled enclave instances")
    enclaves.add_argument("--deployment", default="", help="only this deployment's (default: all)")
    enclaves.set_defaults(run=_enclaves)
    add_audit_commands(commands, common)
    add_admin_cert_command(commands, common)
    add_replica_commands(commands, common)
    add_console_commands(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    ConsoleParser.json_errors = "--json" in words
    parser = _parser()
    args = parser.parse_args(words)
    if args.command == "revoke" and (args.units is None) == (not args.all):
        parser.error("revoke takes either UNITS or --all")
    check_remote_options(parser, args)
    check_serve_options(parser, args)
    level = logging.DEBUG if args.verbose else logging.INFO if args.command == "serve" else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        return reader_gone()
    except (CustodianError, EnclaveError, OSError) as exc:
        if args.verbose:
            logger.exception("failed")
        text = exc.diagnostics() if isinstance(exc, (CustodianError, EnclaveError)) else str(exc)
        try:
            return failure(type(exc).__name__, text, 1, as_json=args.json)
        except BrokenPipeError:
            return reader_gone()
    except KeyboardInterrupt:
        return 130
    return 0


# ------------------------------------------------------------------ output


def _console(args: argparse.Namespace) -> Console:
    return console_for(args)


# ---------------------------------------------------------------- commands


def _serve(args: argparse.Namespace) -> None:
    # Whatever the custodian or a library under it creates is its user's alone (the admin socket
    # included, between its bind and its chmod).
    os.umask(0o077)
    config = CustodianConfig(
        data_dir=args.data,
        listen=args.listen,
        mtls_listen=args.mtls_listen,
        metrics_listen=args.metrics,
        admin_listen=args.admin_listen,
        console_listen=args.console,
        pccs_url=args.pccs,
        collateral_dir=args.collateral_dir,
        amd_kds=args.amd_kds,
        database=args.database,
        master_key=args.master_key,
    )
    asyncio.run(_run_server(config, as_json=args.json))


async def _run_server(config: CustodianConfig, *, as_json: bool) -> None:
    server = await CustodianServer.start(config)
    stopping: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stopping.add(asyncio.ensure_future(server.stop())))
    assert server.endpoints is not None
    ready = server.endpoints.to_json()
    if as_json:
        print(json.dumps(ready, sort_keys=True), flush=True)
    else:
        print(f"custodian ready: enrolment {ready['enrolment']}, gateway {ready['gateway']}", flush=True)
    await server.wait()


def _ca(args: argparse.Namespace) -> None:
    with _console(args) as console:
        pem = console.custodian_ca()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    emit(args, {"pem": pem.decode(), "sha256": hashlib.sha256(der).hexdigest()}, pem.decode().rstrip())


_USAGE_COLUMNS = (
    "name",
    "model",
    "suspended",
    "balance",
    "leased",
    "used",
    "unreported",
    "revoked",
    "overdrawn",
    "granted_total",
    "instances",
    "unit",
    "prompt_tokens",
    "completion_tokens",
)


def _change(args: argparse.Namespace, verb: str, call: Callable[[Console], Message]) -> None:
    with _console(args) as console:
        change = plain(call(console))
    usage = change["usage"]
    unit = "tokens" if usage["unit"] == "token" else "units"
    emit(
        args, change, f"{verb} {change['changed']} {unit}; {usage['name']} balance is now {usage['balance']}"
    )


def _grant(args: argparse.Namespace) -> None:
    _change(args, "granted", lambda c: c.grant(args.deployment, args.units))


def _revoke(args: argparse.Namespace) -> None:
    _change(args, "revoked", lambda c: c.revoke(args.deployment, units=args.units or 0, everything=args.all))


def _suspend(args: argparse.Namespace) -> None:
    with _console(args) as console:
        usage = plain(console.suspend(args.deployment))
    emit(args, usage, f"deployment {usage['name']} suspended")


def _resume(args: argparse.Namespace) -> None:
    with _console(args) as console:
        usage = plain(console.resume(args.deployment))
    emit(args, usage, f"deployment {usage['name']} resumed")


def _usage(args: argparse.Namespace) -> None:
    with _console(args) as console:
        usages = [plain(u) for u in console.usage(args.deployment)]
    emit(args, usages, table(usages, _USAGE_COLUMNS))


_ENCLAVE_COLUMNS = (
    "instance_id",
    "deployment",
    "state",
    "offline_since",
    "lease_state",
    "lease_limit",
    "lease_used",
    "last_receipt_seq",
    "last_seen",
)


def _enclaves(args: argparse.Namespace) -> None:
    with _console(args) as console:
        enclaves = [plain(e) for e in console.enclaves(args.deployment)]
    # Among replicas, which one holds each enclave's control stream.
    columns = (*_ENCLAVE_COLUMNS, "replica") if any(e["replica"] for e in enclaves) else _ENCLAVE_COLUMNS
    emit(args, enclaves, table(enclaves, columns))


if __name__ == "__main__":
    sys.exit(main())
