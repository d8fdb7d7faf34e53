"""The ``custodian audit`` commands: show and check the audit log, export it, verify an export offline.

These read the ledger file directly (read-only), so they work with or without
a running custodian; ``audit verify`` needs only the exported file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from custodian.audit import verify_chain
from custodian.audit_file import export_lines, since_seq, verify_file, write_export
from custodian.ledger import AuditEntry, Ledger

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
    export.set_defaults(run=_audit_export)
    check = audit_actions.add_parser(
        "verify",
        parents=[common],
        help="check an export offline: the hash chain and every receipt signature (no server needed)",
    )
    check.add_argument("file", type=Path, help="a file from `custodian audit export`")
    check.set_defaults(run=_audit_verify)


def _audit(args: argparse.Namespace) -> None:
    entries, length = asyncio.run(_read_audit(args.data / "ledger.sqlite3", args.last or None))
    docs = [
        {
            "seq": e.seq,
            "at": e.at,
            "actor": e.actor,
            "action": e.action,
            "subject": e.subject,
            "detail": e.detail,
        }
        for e in entries
    ]
    lines = [f"audit log intact: {length} entries"]
    lines += [
        f"{d['seq']:>6} {d['at']} {d['actor']} {d['action']} {d['subject']} {json.dumps(d['detail'])}"
        for d in docs
    ]
    emit(args, {"intact": True, "entries": length, "last": docs}, "\n".join(lines))


def _audit_export(args: argparse.Namespace) -> None:
    summary = asyncio.run(_export(args.data / "ledger.sqlite3", args.out, args.since))
    emit(
        args,
        summary,
        f"wrote {summary['entries']} audit entries ({summary['first_seq']}..{summary['last_seq']})"
        f" and {summary['instances']} instance keys to {args.out}",
    )


async def _export(path: Path, out: Path, since: str | None) -> dict[str, Any]:
    ledger = await Ledger.open(path, readonly=True)
    try:
        async with ledger.transaction() as tx:
            entries = await tx.audit_entries()
            verify_chain(entries)
            first = since_seq(entries, since) if since else 1
            selected = [e for e in entries if e.seq >= first]
            # The anchor a partial export is checked from: the hash of the entry before it.
            previous = await tx.audit_hash(min(first, len(entries) + 1) - 1)
            instances = await tx.instances()
    finally:
        await ledger.close()
    write_export(out, export_lines(selected, previous, instances, now=datetime.now(UTC)))
    return {
        "file": str(out),
        "entries": len(selected),
        "first_seq": selected[0].seq if selected else 0,
        "last_seq": selected[-1].seq if selected else 0,
        "instances": len(instances),
    }


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


async def _read_audit(path: Path, last: int | None) -> tuple[list[AuditEntry], int]:
    ledger = await Ledger.open(path, readonly=True)
    try:
        async with ledger.transaction() as tx:
            length = await tx.verify_audit()
            return await tx.audit_entries(last=last), length
    finally:
        await ledger.close()
