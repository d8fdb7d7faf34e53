"""``custodian serve --console`` and ``custodian console login``: the web console from the command line."""

from __future__ import annotations

import argparse
import getpass
import os
import socket
from typing import Any

from custodian._cli_args import address
from custodian._cli_audit import emit
from custodian.config import Address
from custodian.web.login_socket import request_login_url


def console_address(text: str) -> Address:
    """HOST:PORT, or PORT alone for loopback (127.0.0.1)."""
    return address(f"127.0.0.1:{text}" if text.isdigit() else text)


def add_console_option(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--console",
        type=console_address,
        default=os.environ.get("CUSTODIAN_CONSOLE") or None,
        metavar="HOST:PORT",
        help="serve the web console over HTTP here (PORT alone: 127.0.0.1:PORT; plain HTTP, so keep it"
        " on loopback or behind TLS; env CUSTODIAN_CONSOLE; default: off);"
        " log in with `custodian console login`",
    )


def add_console_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    console = commands.add_parser("console", help="the web console").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    console.add_parser(
        "login",
        parents=[common],
        help="print a one-time login URL for the web console (valid 5 minutes, opens one session)",
    ).set_defaults(run=_login)


def _login(args: argparse.Namespace) -> None:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    url = request_login_url(args.data / "console.sock", f"{user}@{socket.gethostname()}")
    emit(args, {"url": url, "valid_seconds": 300}, url)
