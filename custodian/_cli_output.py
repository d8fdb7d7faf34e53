"""What the ``custodian`` console prints: tables, plain JSON of replies, and its failures.

With ``--json`` every outcome is one JSON object on stdout, a failure too:
``{"error": KIND, "reason": TEXT, "exit_code": N}`` (the shape ``custos-query
--json`` uses); without it a failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from google.protobuf.message import Message

# Exit status of a command whose reader went away (``custodian usage | head -1``): what a
# process killed by SIGPIPE reports, so that pipelines treat it as they treat any other tool.
BROKEN_PIPE_EXIT = 128 + 13


def plain(message: Message) -> dict[str, Any]:
    """A message's fields as plain JSON values (numbers stay numbers, bytes become text)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if isinstance(value, Message):
            value = plain(value)
        elif isinstance(value, bytes):
            value = value.decode()
        elif not isinstance(value, str | int | float):  # a repeated field
            value = [plain(v) if isinstance(v, Message) else v for v in value]
        out[field.name] = value
    return out


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def failure(kind: str, reason: str, exit_code: int, *, as_json: bool) -> int:
    """Report a failed command once, in the form the caller asked for; returns its exit status."""
    if as_json:
        print(json.dumps({"error": kind, "reason": reason, "exit_code": exit_code}, indent=2), flush=True)
    else:
        print(f"custodian: {reason}", file=sys.stderr)
    return exit_code


def reader_gone() -> int:
    """Stdout's reader closed the pipe: say nothing more and stop writing to it."""
    # Python flushes stdout again at exit; pointing it at /dev/null keeps that flush quiet.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE_EXIT


class ConsoleParser(argparse.ArgumentParser):
    """An argument parser whose misuse report is a JSON object too when ``--json`` is on the line."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        if ConsoleParser.json_errors:
            failure("UsageError", f"{self.prog}: {message}", 2, as_json=True)
        else:
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)
