"""The ``custodian audit`` commands: show and check the audit log, export it, verify an export offline.

``audit`` and ``audit export`` read the ledger file directly (read-only), so
they work with or without a running custodian, in bounded memory
(``custodian.audit_stream``); ``audit verify`` needs only the exported file.
Given ``--admin``, ``audit`` and ``audit export`` read the log from that
custodian's admin listener instead (``custodian._audit_remote``) and check it
here, the same way; they never fall back to a local file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from custodian._audit_remote import RemoteAudit
from custodian._cli_args import add_database_option
from custodian.audit_file import verify_file
from custodian.audit_stream import AuditSource, Exported, LedgerAudit, Tail, check_tail, export
from custodian.console import RemoteAdmin
from custodian.errors import ConsoleError
from custodian.ledger import Ledger

T = TypeVar("T")

# Argument parsing and output shared with ``custodian.cli``.


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else text)


def add_audit_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    audit = commands.add_parser(
        "audit",
        parents=[common],
        help="verify the hash-chained audit log and print its last entries; export it; check an export",
    )
    audit.add_argument(
        "--last", type=count, default=20, help="entries to print (default %(default)s; 0: all)"
    )
    add_database_option(audit, what="read the log from this PostgreSQL database (replicas)")
    audit.set_defaults(run=_audit)
    audit_actions = audit.add_subparsers(dest="action", metavar="ACTION")
    export = audit_actions.add_parser(
        "export",
        parents=[common],
        help="write the audit log as JSON Lines, with the instances' public keys (reads the ledger)",
    )
    export.add_argument("--out", type=Path, required=True, help="the file to write")
    export.add_argument(
        "--since", help="first entry to export: an entry number, or an ISO 8601 time (default: all)"
    )
    add_database_option(export, what="read the log from this PostgreSQL database (replicas)")
    export.set_defaults(run=_audit_export)
    check = audit_actions.add_parser(
        "verify",
        parents=[common],
        help="check an export offline: the hash chain and every receipt signature (no server needed)",
    )
    check.add_argument("file", type=Path, help="a file from `custodian audit export`")
    check.set_defaults(run=_audit_verify)


def _audit(args: argparse.Namespace) -> None:
    tail: Tail = _run(args, lambda source: check_tail(source, args.last or None))
    docs = [
        {
            "seq": e.seq,
            "at": e.at,
            "actor": e.actor,
            "action": e.action,
            "subject": e.subject,
            "detail": e.detail,
        }
        for e in tail.shown
    ]
    lines = [f"audit log intact: {tail.length} entries"]
    lines += [
        f"{d['seq']:>6} {d['at']} {d['actor']} {d['action']} {d['subject']} {json.dumps(d['detail'])}"
        for d in docs
    ]
    emit(args, {"intact": True, "entries": tail.length, "last": docs}, "\n".join(lines))


def _audit_export(args: argparse.Namespace) -> None:
    done: Exported = _run(args, lambda source: export(source, args.out, args.since, now=datetime.now(UTC)))
    summary = {
        "file": str(args.out),
        "entries": done.entries,
        "first_seq": done.first_seq,
        "last_seq": done.last_seq,
        "instances": done.instances,
    }
    emit(
        args,
        summary,
        f"wrote {done.entries} audit entries ({done.first_seq}..{done.last_seq})"
        f" and {done.instances} instance keys to {args.out}",
    )


def _ledger_file(data: Path) -> Path:
    path = data / "ledger.sqlite3"
    if not path.exists() and (data / "master.key").exists():
        raise ConsoleError(
            f"{data} is the data directory of a replica on PostgreSQL: its ledger is in the database;"
            " give --database URL (or CUSTODIAN_DATABASE)"
        )
    return path


def _run(args: argparse.Namespace, work: Callable[[AuditSource], Awaitable[T]]) -> T:
    """Run ``work`` on the audit log: over ``--admin`` when given, else ``--database`` or the ledger file."""

    async def local() -> T:
        ledger = await Ledger.open(args.database or _ledger_file(args.data), readonly=True)
        try:
            return await work(LedgerAudit(ledger))
        finally:
            await ledger.close()

    async def remote(admin: RemoteAdmin) -> T:
        async with RemoteAudit(admin) as source:
            return await work(source)

    if args.admin is None:
        return asyncio.run(local())
    admin = RemoteAdmin(
        address=args.admin,
        key_pem=_read(args.admin_key),
        certificate_pem=_read(args.admin_cert),
        custodian_ca_pem=_read(args.custodian_ca),
    )
    return asyncio.run(remote(admin))


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConsoleError(f"cannot read {path}: {exc.strerror}") from None


def _audit_verify(args: argparse.Namespace) -> None:
    verified = verify_file(args.file)
    deployments = {
        name: {"proven": t.proven, "unreported": t.unreported}
        for name, t in sorted(verified.deployments.items())
    }
    doc = {
        "intact": True,
        "entries": verified.entries,
        "first_seq": verified.first_seq,
        "last_hash": verified.last_hash.hex(),
        "receipts": verified.receipts,
        "anchored_instances": verified.anchored_instances,
        "deployments": deployments,
    }
    lines = [
        f"{args.file}: audit chain intact, {verified.entries} entries from {verified.first_seq},"
        f" {verified.receipts} receipts verified",
        f"last hash {doc['last_hash']}",
    ]
    lines += [
        f"  {name}: receipts prove {t['proven']} units; {t['unreported']} charged without receipts"
        for name, t in deployments.items()
    ]
    emit(args, doc, "\n".join(lines))
