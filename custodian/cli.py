"""``custodian``: run the custodian server and administer it from the console.

Exit status: 0 on success, 1 when the custodian refuses or fails (one line on
stderr; the traceback with ``--verbose``), 2 when the arguments are wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import Message

from custodian._cli_admin import add_admin_cert_command, add_remote_options, check_remote_options, console_for
from custodian._cli_audit import add_audit_commands, count, emit
from custodian.config import Address, CustodianConfig
from custodian.console import Console
from custodian.errors import ConfigError, CustodianError
from custodian.server import CustodianServer
from enclave.collateral._http import check_base_url
from enclave.collateral.amd_kds import DEFAULT_KDS_URL
from enclave.errors import EnclaveError

logger = logging.getLogger("custodian")

DEFAULT_DATA = "custodian-data"


def _address(text: str) -> Address:
    try:
        return Address.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _kds(text: str) -> str | None:
    """``--amd-kds``: an http(s) base URL, or ``off`` (None)."""
    if text == "off":
        return None
    try:
        return check_base_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


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


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, here=False)

    parser = argparse.ArgumentParser(
        prog="custodian",
        description="Lend an ONNX model to attested enclaves and meter every inference.",
        epilog="Run `custodian serve` first; the other commands talk to it over DATA/admin.sock.",
    )
    _global_options(parser, here=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the custodian server")
    serve.add_argument(
        "--listen",
        type=_address,
        default=os.environ.get("CUSTODIAN_LISTEN", "127.0.0.1:7443"),
        help="enrolment listener, TLS (env CUSTODIAN_LISTEN; default %(default)s)",
    )
    serve.add_argument(
        "--mtls-listen",
        type=_address,
        default=os.environ.get("CUSTODIAN_MTLS_LISTEN") or None,
        help="gateway listener, mutual TLS (env CUSTODIAN_MTLS_LISTEN; default: the --listen host, PORT+1)",
    )
    serve.add_argument(
        "--metrics",
        type=_address,
        default=os.environ.get("CUSTODIAN_METRICS") or None,
        help="Prometheus metrics over HTTP, HOST:PORT (env CUSTODIAN_METRICS; default: off)",
    )
    serve.add_argument(
        "--admin-listen",
        type=_address,
        default=os.environ.get("CUSTODIAN_ADMIN_LISTEN") or None,
        help="admin API over TCP, mutual TLS with `custodian admin-cert` certificates"
        " (env CUSTODIAN_ADMIN_LISTEN; default: the unix socket only)",
    )
    serve.add_argument(
        "--amd-kds",
        metavar="URL",
        type=_kds,
        default=os.environ.get("CUSTODIAN_AMD_KDS") or DEFAULT_KDS_URL,
        help="AMD KDS for SEV-SNP enrolments: the VCEK and chain a report lacks, and the CRL, cached"
        " under DATA/collateral/amd; 'off' uses only what the evidence carries"
        " (env CUSTODIAN_AMD_KDS; default %(default)s)",
    )
    serve.set_defaults(run=_serve)

    commands.add_parser(
        "ca", parents=[common], help="print the custodian TLS CA (PEM) that enclaves pin and manifests name"
    ).set_defaults(run=_ca)

    model = commands.add_parser("model", help="models at rest").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    add = model.add_parser("add", parents=[common], help="seal an ONNX model and keep it encrypted at rest")
    add.add_argument("file", type=Path, help="the model file")
    add.add_argument("--name", help="model name (default: the file name without its extension)")
    add.set_defaults(run=_model_add)
    model.add_parser("list", parents=[common], help="list the models").set_defaults(run=_model_list)

    deployment = commands.add_parser("deployment", help="deployments of a model").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = deployment.add_parser(
        "create", parents=[common], help="lend a model under a manifest; prints the join token once"
    )
    create.add_argument("name", help="deployment name")
    create.add_argument("--model", required=True, help="the model it lends")
    create.add_argument(
        "--manifest", type=Path, required=True, help="manifest (TOML) from `enclave manifest`"
    )
    create.add_argument(
        "--offline-grace",
        type=count,
        default=0,
        help="seconds an enclave serves without the custodian (0: default)",
    )
    create.add_argument("--lease-size", type=count, default=0, help="units per enclave lease (0: default)")
    create.add_argument(
        "--zeroize-after",
        type=count,
        default=0,
        help="seconds without a renewed lease (or suspended) before an enclave drops the model and its"
        " keys and must enrol again (0: default, four times the offline grace)",
    )
    create.set_defaults(run=_deployment_create)
    rotate = deployment.add_parser("rotate-token", parents=[common], help="replace the join token")
    rotate.add_argument("name")
    rotate.set_defaults(run=_deployment_rotate)
    manifest = deployment.add_parser(
        "manifest",
        parents=[common],
        help="print the approved manifest, for end users to check enclaves against",
    )
    manifest.add_argument("name")
    manifest.add_argument("--out", type=Path, help="write the manifest to this file instead of stdout")
    manifest.set_defaults(run=_deployment_manifest)

    grant = commands.add_parser("grant", parents=[common], help="add inference units to a deployment")
    grant.add_argument("deployment")
    grant.add_argument("units", type=_positive)
    grant.set_defaults(run=_grant)
    revoke = commands.add_parser(
        "revoke", parents=[common], help="take units back: the free balance first, then the enclaves' leases"
    )
    revoke.add_argument("deployment")
    revoke.add_argument("units", type=_positive, nargs="?", help="how many (or --all)")
    revoke.add_argument("--all", action="store_true", help="take back every unit not used yet")
    revoke.set_defaults(run=_revoke)
    for name, run, text in (
        ("suspend", _suspend, "stop every enclave of a deployment at once"),
        ("resume", _resume, "let a suspended deployment serve again"),
    ):
        sub = commands.add_parser(name, parents=[common], help=text)
        sub.add_argument("deployment")
        sub.set_defaults(run=run)

    usage = commands.add_parser("usage", parents=[common], help="quota and usage per deployment")
    usage.add_argument("deployment", nargs="?", default="")
    usage.set_defaults(run=_usage)
    enclaves = commands.add_parser("enclaves", parents=[common], help="enrolled enclave instances")
    enclaves.add_argument("--deployment", default="", help="only this deployment's")
    enclaves.set_defaults(run=_enclaves)
    add_audit_commands(commands, common)
    add_admin_cert_command(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "revoke" and (args.units is None) == (not args.all):
        parser.error("revoke takes either UNITS or --all")
    check_remote_options(parser, args)
    level = logging.DEBUG if args.verbose else logging.INFO if args.command == "serve" else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except (CustodianError, EnclaveError, OSError) as exc:
        if args.verbose:
            logger.exception("failed")
        text = exc.diagnostics() if isinstance(exc, (CustodianError, EnclaveError)) else str(exc)
        print(f"custodian: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# ------------------------------------------------------------------ output


def _plain(message: Message) -> dict[str, Any]:
    """A message's fields as plain JSON values (numbers stay numbers, bytes become text)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if isinstance(value, Message):
            value = _plain(value)
        elif isinstance(value, bytes):
            value = value.decode()
        out[field.name] = value
    return out


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [
        [str(row[c]).lower() if isinstance(row[c], bool) else str(row[c]) for c in columns] for row in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _console(args: argparse.Namespace) -> Console:
    return console_for(args)


# ---------------------------------------------------------------- commands


def _serve(args: argparse.Namespace) -> None:
    config = CustodianConfig(
        data_dir=args.data,
        listen=args.listen,
        mtls_listen=args.mtls_listen,
        metrics_listen=args.metrics,
        admin_listen=args.admin_listen,
        amd_kds=args.amd_kds,
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


_MODEL_COLUMNS = ("name", "size", "chunk_count", "sha384", "created_at")


def _model_add(args: argparse.Namespace) -> None:
    name = args.name or args.file.stem
    with _console(args) as console:
        info = _plain(console.add_model(name, args.file))
    emit(args, info, f"model {info['name']} sealed: {info['size']} bytes, sha384 {info['sha384']}")


def _model_list(args: argparse.Namespace) -> None:
    with _console(args) as console:
        models = [_plain(m) for m in console.list_models()]
    emit(args, models, _table(models, _MODEL_COLUMNS))


def _deployment_create(args: argparse.Namespace) -> None:
    manifest = args.manifest.read_text()
    with _console(args) as console:
        created = console.create_deployment(
            args.name,
            model=args.model,
            manifest=manifest,
            offline_grace_seconds=args.offline_grace,
            lease_size=args.lease_size,
            zeroize_after_seconds=args.zeroize_after,
        )
    emit(args, _plain(created), _token_text(created.name, created.join_token))


def _deployment_rotate(args: argparse.Namespace) -> None:
    with _console(args) as console:
        rotated = console.rotate_token(args.name)
    emit(args, _plain(rotated), _token_text(rotated.name, rotated.join_token))


def _token_text(name: str, token: str) -> str:
    return f"deployment {name}: join token (shown once, give it to the borrower):\n{token}"


def _deployment_manifest(args: argparse.Namespace) -> None:
    with _console(args) as console:
        text = console.manifest(args.name)
    if args.out is None:
        emit(args, {"manifest": text}, text.rstrip())
        return
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(text)
    partial.replace(args.out)
    emit(args, {"manifest_file": str(args.out)}, f"wrote the end-user manifest of {args.name} to {args.out}")


_USAGE_COLUMNS = (
    "name",
    "model",
    "suspended",
    "balance",
    "leased",
    "used",
    "unreported",
    "granted_total",
    "instances",
)


def _change(args: argparse.Namespace, verb: str, call: Callable[[Console], Message]) -> None:
    with _console(args) as console:
        change = _plain(call(console))
    usage = change["usage"]
    emit(args, change, f"{verb} {change['changed']} units; {usage['name']} balance is now {usage['balance']}")


def _grant(args: argparse.Namespace) -> None:
    _change(args, "granted", lambda c: c.grant(args.deployment, args.units))


def _revoke(args: argparse.Namespace) -> None:
    _change(args, "revoked", lambda c: c.revoke(args.deployment, units=args.units or 0, everything=args.all))


def _suspend(args: argparse.Namespace) -> None:
    with _console(args) as console:
        usage = _plain(console.suspend(args.deployment))
    emit(args, usage, f"deployment {usage['name']} suspended")


def _resume(args: argparse.Namespace) -> None:
    with _console(args) as console:
        usage = _plain(console.resume(args.deployment))
    emit(args, usage, f"deployment {usage['name']} resumed")


def _usage(args: argparse.Namespace) -> None:
    with _console(args) as console:
        usages = [_plain(u) for u in console.usage(args.deployment)]
    emit(args, usages, _table(usages, _USAGE_COLUMNS))


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
        enclaves = [_plain(e) for e in console.enclaves(args.deployment)]
    emit(args, enclaves, _table(enclaves, _ENCLAVE_COLUMNS))


if __name__ == "__main__":
    sys.exit(main())
