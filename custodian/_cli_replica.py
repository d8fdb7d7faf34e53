"""The console's options and command for replicas on PostgreSQL: ``--database``, ``--master-key``,
``custodian replica init``.

A database URL may hold a password: it is checked here without ever being
repeated (argparse would print a refused value), and ``custodian.replica``
and the ledger name the database only with its password masked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from custodian import replica
from custodian._cli_args import DATABASE_ENV, add_database_option
from custodian._cli_audit import emit
from custodian.errors import ConfigError

MASTER_KEY_ENV = "CUSTODIAN_MASTER_KEY"


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    add_database_option(
        serve,
        what="run as one of several replicas on this PostgreSQL database: the ledger, the keys (wrapped by"
        " the master key) and the sealed models are kept there",
    )
    serve.add_argument(
        "--master-key",
        metavar="FILE",
        type=Path,
        default=os.environ.get(MASTER_KEY_ENV) or None,
        help="with --database: the master key that wraps the replicas' shared keys, a copy of the file"
        f" the first replica wrote (env {MASTER_KEY_ENV}; default DATA/master.key)",
    )


def add_replica_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    actions = commands.add_parser("replica", help="replicas on PostgreSQL").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    init = actions.add_parser(
        "init",
        parents=[common],
        help="check a new replica's data directory, database and master key; say what is missing",
    )
    add_serve_options(init)
    init.set_defaults(run=_init)


def check_serve_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if getattr(args, "master_key", None) is not None and getattr(args, "database", None) is None:
        parser.error("--master-key is for replicas on PostgreSQL: give --database too")
    if args.command == "replica" and args.database is None:
        parser.error(f"replica init needs --database URL (or {DATABASE_ENV})")
    database = getattr(args, "database", None)
    if database and database != os.environ.get(DATABASE_ENV) and _has_password(database):
        print(
            f"warning: --database holds a password, which every local user can read in the process list;"
            f" set {DATABASE_ENV} instead",
            file=sys.stderr,
        )


def _has_password(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.password is not None or any(k.lower() == "password" for k, _ in parse_qsl(parts.query))
    except ValueError:
        return False


def _init(args: argparse.Namespace) -> None:
    master_key: Path = args.master_key or args.data / replica.MASTER_KEY_FILE
    problems, state = asyncio.run(replica.check(args.data, args.database, master_key))
    doc = {"ready": not problems, "problems": problems, "state": state, "master_key": str(master_key)}
    if problems:
        raise ConfigError("this replica is not ready: " + "; ".join(problems))
    emit(args, doc, f"ready: {state}")
