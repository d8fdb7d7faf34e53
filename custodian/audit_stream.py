"""Reading the audit log as a stream: check its chain, show its tail, export it, in bounded memory.

The log only grows (and an enrolled enclave once could grow it by hundreds of
megabytes), so nothing here holds it whole: entries are read a page at a time
(``PAGE_ENTRIES``), each page in a transaction of its own so that a reader
never holds the ledger long, and checked as they come (``ChainCheck``). Pages
read in separate transactions agree: entries are never changed, only appended,
and a reader stops at the last entry it first checked.

``AuditSource`` is where the entries come from: the ledger file
(``LedgerAudit``), or the custodian's admin API over ``--admin``
(``custodian._audit_remote``). The commands run the same checks on either, so a
remote auditor checks the chain on its own machine.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from custodian.audit import GENESIS, AuditEntry
from custodian.audit_file import (
    ChainCheck,
    entry_line,
    header_line,
    instance_line,
    parse_since,
    written_at_or_after,
)
from custodian.errors import LedgerError
from custodian.ledger import InstanceRecord, Ledger
from custodian.output_file import replacing

# Entries per page: a page of the largest entries ever written (1 MiB) stays within 64 MiB.
PAGE_ENTRIES = 64


class AuditSource(Protocol):
    def entries(self, *, after: int = 0) -> AsyncIterator[AuditEntry]:
        """Every entry following entry ``after``, in order, as they are read."""
        ...

    async def instances(self) -> list[InstanceRecord]: ...


class LedgerAudit:
    """The audit log of a ledger, read a page per transaction."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def entries(self, *, after: int = 0) -> AsyncIterator[AuditEntry]:
        while True:
            async with self._ledger.transaction() as tx:
                page = await tx.audit_page(after, PAGE_ENTRIES)
            for entry in page:
                yield entry
            if len(page) < PAGE_ENTRIES:
                return
            after = page[-1].seq

    async def instances(self) -> list[InstanceRecord]:
        async with self._ledger.transaction() as tx:
            return await tx.instances()


@dataclass(frozen=True)
class Tail:
    """The whole chain checked, and the entries a reader asked to see."""

    length: int
    last_hash: bytes
    shown: list[AuditEntry]


async def check_tail(source: AuditSource, last: int | None) -> Tail:
    """Check the whole chain; keep only its ``last`` entries (None: keep them all)."""
    chain = ChainCheck()
    kept: collections.deque[AuditEntry] = collections.deque(maxlen=last)
    async for entry in source.entries():
        chain.add(entry)
        kept.append(entry)
    return Tail(chain.length, chain.last_hash, list(kept))


@dataclass(frozen=True)
class Exported:
    entries: int
    first_seq: int
    last_seq: int
    instances: int


async def export(source: AuditSource, out: Path, since: str | None, *, now: datetime) -> Exported:
    """Write the export of ``custodian.audit_file`` to ``out``, the chain checked first.

    Two passes: the first checks the whole chain and finds where the export starts and ends
    (the header names both), the second writes the entries up to that end. Entries appended
    meanwhile are left for the next export.
    """
    wanted = parse_since(since) if since else 1
    chain = ChainCheck()
    first, previous = 0, GENESIS
    async for entry in source.entries():
        if not first and (
            entry.seq >= wanted if isinstance(wanted, int) else written_at_or_after(entry, wanted)
        ):
            first, previous = entry.seq, chain.last_hash
        chain.add(entry)
    last = chain.next_seq - 1
    if not first:
        previous = chain.last_hash
    instances = await source.instances()
    written = ChainCheck(previous=previous, first_seq=first or 1)
    with replacing(out) as handle:
        handle.write(
            header_line(
                first_seq=first,
                last_seq=last if first else 0,
                previous_hash=previous,
                last_hash=chain.last_hash,
                now=now,
            ).encode()
            + b"\n"
        )
        for instance in instances:
            handle.write(instance_line(instance).encode() + b"\n")
        if first:
            async for entry in source.entries(after=first - 1):
                if entry.seq > last:
                    break
                written.add(entry)  # what is written is the chain the first pass checked
                handle.write(entry_line(entry).encode() + b"\n")
        if written.last_hash != chain.last_hash:
            raise LedgerError("the audit log changed under the export; run it again")
    return Exported(written.length, first, last if first else 0, len(instances))
