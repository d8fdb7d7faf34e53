"""Which of two copies of DCAP collateral is the fresher: the one the evidence carries or the relying party's.

Intel signs its collateral, so anyone may carry it: the enclave attaches the
documents for its quote to its evidence, and a relying party that has its own
copy (the custodian's cache) uses whichever is more current, piece by piece.
TCB info and QE identity compare by ``tcbEvaluationDataNumber`` (Intel raises
it at each TCB recovery), then by ``issueDate``; CRLs by ``thisUpdate``. On a
tie the relying party's copy wins. The dates are read before any signature is
checked; the chosen copy is then verified in full, so a forged date can only
get its own evidence refused. A piece whose dates do not parse loses to one
whose dates do. No I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TypeVar

from cryptography import x509

from enclave.attestation.dcap_collateral import COLLATERAL_NAMES, Collateral, SignedDocument
from enclave.errors import EvidenceError

CARRIED = "evidence"
OWN = "relying party"
_T = TypeVar("_T")


@dataclass(frozen=True)
class Currency:
    """How current a collateral document is, read without checking its signature."""

    evaluation_number: int
    issued: datetime
    next_update: datetime

    @property
    def rank(self) -> tuple[int, datetime]:
        return self.evaluation_number, self.issued


def signed_document_currency(doc: SignedDocument) -> Currency | None:
    """The TCB evaluation data number, issue date and next update of TCB info or a QE identity."""
    try:
        body = json.loads(doc.text)
        number = body["tcbEvaluationDataNumber"]
        if not isinstance(number, int) or isinstance(number, bool):
            return None
        return Currency(number, _date(body["issueDate"]), _date(body["nextUpdate"]))
    except (ValueError, KeyError, TypeError):
        return None


def crl_currency(der: bytes) -> Currency | None:
    """A CRL's thisUpdate and nextUpdate (CRLs have no evaluation data number: 0)."""
    try:
        crl = x509.load_der_x509_crl(der)
        next_update = crl.next_update_utc
        return Currency(0, crl.last_update_utc, next_update) if next_update is not None else None
    except ValueError:
        return None


def fresher(carried: Collateral, own: Collateral) -> tuple[Collateral, dict[str, str]]:
    """Piece by piece the more current of the two, and for each piece used, whose copy it is."""
    chosen = Collateral()
    sources: dict[str, str] = {}
    for name in ("tcb_info", "qe_identity"):
        pick = _pick(getattr(carried, name), getattr(own, name), signed_document_currency)
        if pick is not None:
            chosen = replace(chosen, **{name: pick[0]})
            sources[name] = pick[1]
    root = _pick(carried.root_ca_crl, own.root_ca_crl, crl_currency)
    if root is not None:
        chosen = replace(chosen, root_ca_crl=root[0])
        sources["root_ca_crl"] = root[1]
    pck = _pick(carried.pck_crl, own.pck_crl, crl_currency)
    if pck is not None:
        source = carried if pck[1] == CARRIED else own
        chosen = replace(chosen, pck_crl=pck[0], pck_crl_issuer_chain=source.pck_crl_issuer_chain)
        sources["pck_crl"] = pck[1]
    return chosen, sources


def _pick(
    carried: _T | None, own: _T | None, currency: Callable[[_T], Currency | None]
) -> tuple[_T, str] | None:
    if carried is None:
        return (own, OWN) if own is not None else None
    if own is None:
        return carried, CARRIED
    ours, theirs = currency(own), currency(carried)
    if theirs is not None and (ours is None or theirs.rank > ours.rank):
        return carried, CARRIED
    return own, OWN


def _date(value: object) -> datetime:
    if not isinstance(value, str):
        raise TypeError("not a date string")
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError("a date without a time zone")
    return when


# --- collateral carried in evidence -----------------------------------------------------------

CARRIED_PREFIX = "collateral."
# Intel's documents for one quote come to about 20 KiB; the bound leaves room for TCB info growth.
MAX_CARRIED_BYTES = 96 * 1024


def attach(parts: Mapping[str, bytes], collateral: Mapping[str, bytes]) -> dict[str, bytes]:
    """Evidence parts with ``collateral`` (named as in :data:`COLLATERAL_NAMES`) added."""
    carried = {CARRIED_PREFIX + name: blob for name, blob in collateral.items()}
    unknown = sorted(name for name in collateral if name not in COLLATERAL_NAMES)
    if unknown:
        raise EvidenceError(f"unknown DCAP collateral {unknown}")
    _check_size(carried)
    return {**parts, **carried}


def carried_collateral(parts: Mapping[str, bytes]) -> dict[str, bytes]:
    """The collateral an evidence's parts carry, by collateral name; refuses any part it does not know."""
    carried = {name: blob for name, blob in parts.items() if name.startswith(CARRIED_PREFIX)}
    others = sorted(set(parts) - set(carried) - {"quote"})
    if others:
        raise EvidenceError(f"DCAP evidence has unknown parts {others}")
    _check_size(carried)
    named = {name.removeprefix(CARRIED_PREFIX): blob for name, blob in carried.items()}
    unknown = sorted(name for name in named if name not in COLLATERAL_NAMES)
    if unknown:
        raise EvidenceError(f"DCAP evidence carries unknown collateral {unknown}")
    return named


def _check_size(carried: Mapping[str, bytes]) -> None:
    size = sum(len(blob) for blob in carried.values())
    if size > MAX_CARRIED_BYTES:
        raise EvidenceError(f"the evidence carries {size} bytes of collateral, over the {MAX_CARRIED_BYTES}")
