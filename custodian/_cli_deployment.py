"""The ``custodian deployment`` commands: create a deployment, rotate its token, print its manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from custodian import _cli_args as arg
from custodian._cli_admin import console_for
from custodian._cli_audit import emit
from custodian._cli_output import plain
from custodian.config import GRACE_BOUNDS, LEASE_SIZE_BOUNDS, MAX_ZEROIZE_AFTER
from custodian.errors import ConsoleError
from custodian.output_file import write_replacing
from enclave.attestation import ReferenceValues

# A manifest is a few kilobytes of TOML; the admin API takes messages up to 8 MiB in all.
MAX_MANIFEST_BYTES = 1 << 20


def add_deployment_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    deployment = commands.add_parser("deployment", help="deployments of a model").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = deployment.add_parser(
        "create", parents=[common], help="lend a model under a manifest; prints the join token once"
    )
    create.add_argument("name", help="deployment name: 1-64 letters, digits, '.', '_' or '-'")
    create.add_argument("--model", required=True, help="the model it lends (a name from `model list`)")
    create.add_argument(
        "--manifest", type=Path, required=True, help="manifest (TOML, UTF-8) from `enclave manifest`"
    )
    create.add_argument(
        "--offline-grace",
        type=arg.offline_grace,
        default=0,
        help=f"seconds an enclave serves without the custodian, {GRACE_BOUNDS[0]} to {GRACE_BOUNDS[1]}"
        f" (default 0: the server's default, 30)",
    )
    create.add_argument(
        "--lease-size",
        type=arg.lease_size,
        default=0,
        help=f"units per enclave lease, {LEASE_SIZE_BOUNDS[0]} to {LEASE_SIZE_BOUNDS[1]}"
        " (default 0: the server's default, 100)",
    )
    create.add_argument(
        "--zeroize-after",
        type=arg.zeroize_after,
        default=0,
        help="seconds without a renewed lease (or suspended) before an enclave drops the model and its"
        f" keys and must enrol again, {GRACE_BOUNDS[0]} to {MAX_ZEROIZE_AFTER} and at least the offline grace"
        " (default 0: four times the offline grace)",
    )
    create.set_defaults(run=_deployment_create)
    rotate = deployment.add_parser(
        "rotate-token", parents=[common], help="replace the join token (the old one stops working)"
    )
    rotate.add_argument("name", help="the deployment")
    rotate.set_defaults(run=_deployment_rotate)
    manifest = deployment.add_parser(
        "manifest",
        parents=[common],
        help="print the approved manifest, for end users to check enclaves against",
    )
    manifest.add_argument("name", help="the deployment")
    manifest.add_argument("--out", type=Path, help="write the manifest to this file (default: stdout)")
    manifest.set_defaults(run=_deployment_manifest)


def _deployment_create(args: argparse.Namespace) -> None:
    manifest = _manifest_text(args.manifest)
    with console_for(args) as console:
        created = console.create_deployment(
            args.name,
            model=args.model,
            manifest=manifest,
            offline_grace_seconds=args.offline_grace,
            lease_size=args.lease_size,
            zeroize_after_seconds=args.zeroize_after,
        )
    emit(args, plain(created), _token_text(created.name, created.join_token))
    for warning in ReferenceValues.from_toml(manifest).warnings:  # it parsed: the server accepted it
        print(f"WARNING: {warning}", file=sys.stderr)


def _manifest_text(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ConsoleError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ConsoleError(f"manifest {path} is over the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise ConsoleError(f"manifest {path} is not UTF-8 text (byte {exc.start} is not)") from None


def _deployment_rotate(args: argparse.Namespace) -> None:
    with console_for(args) as console:
        rotated = console.rotate_token(args.name)
    emit(args, plain(rotated), _token_text(rotated.name, rotated.join_token))


def _token_text(name: str, token: str) -> str:
    return f"deployment {name}: join token (shown once, give it to the borrower):\n{token}"


def _deployment_manifest(args: argparse.Namespace) -> None:
    with console_for(args) as console:
        text = console.manifest(args.name)
    if args.out is None:
        emit(args, {"manifest": text}, text.rstrip())
        return
    write_replacing(args.out, text.encode())
    emit(args, {"manifest_file": str(args.out)}, f"wrote the end-user manifest of {args.name} to {args.out}")
