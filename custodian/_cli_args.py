"""Argument types of the ``custodian`` console: every number checked against its range at parse time.

A value out of range is misuse (exit 2, with the allowed range), found before
anything is sent to the custodian: the wire's integer types would otherwise
refuse it with a traceback, or the custodian would refuse it after the fact.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from custodian.config import (
    GRACE_BOUNDS,
    LEASE_SIZE_BOUNDS,
    MAX_GRANT_UNITS,
    MAX_ZEROIZE_AFTER,
    Address,
    is_postgres_url,
)
from custodian.errors import ConfigError


def address(text: str) -> Address:
    try:
        return Address.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def whole_number(low: int, high: int, *, zero_means_default: bool = False) -> Callable[[str], int]:
    """A parser of whole numbers from ``low`` to ``high`` (and 0, the custodian's default, if allowed)."""
    allowed = f"{low} to {high}" + (" (or 0: the default)" if zero_means_default else "")

    def parse(text: str) -> int:
        if not text.isascii() or not text.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {allowed}")
        value = int(text)
        if not (low <= value <= high or (zero_means_default and value == 0)):
            raise argparse.ArgumentTypeError(f"{text} is out of range; give {allowed}")
        return value

    return parse


units = whole_number(1, MAX_GRANT_UNITS)
offline_grace = whole_number(*GRACE_BOUNDS, zero_means_default=True)
lease_size = whole_number(*LEASE_SIZE_BOUNDS, zero_means_default=True)
zeroize_after = whole_number(GRACE_BOUNDS[0], MAX_ZEROIZE_AFTER, zero_means_default=True)

DATABASE_ENV = "CUSTODIAN_DATABASE"


def database_url(text: str) -> str:
    if not is_postgres_url(text):
        # Not the value itself: it may be a URL with a password, mistyped.
        raise argparse.ArgumentTypeError(
            "must be a PostgreSQL URL, postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    return text


def add_database_option(parser: argparse.ArgumentParser, *, what: str) -> None:
    parser.add_argument(
        "--database",
        metavar="URL",
        type=database_url,
        default=os.environ.get(DATABASE_ENV) or None,
        help=f"{what} (env {DATABASE_ENV}; default: DATA/ledger.sqlite3)",
    )
