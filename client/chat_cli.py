"""custos-query chat: verify an enclave against a manifest, then talk to its language model.

The answer streams to standard output as it comes; what was verified, and the
tokens each answer cost, go to standard error. Without a PROMPT it is a
conversation: one line of standard input per turn, the answers kept as context.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from client.api import Connection, connect, load_manifest
from client.cli import (
    _address,
    _collateral,
    _failure,
    _seconds,
    _verification_doc,
    _verification_text,
    add_connection_arguments,
)
from client.errors import ClientError, InvalidInputError
from client.generation import (
    MAX_SEED,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    Generation,
    Message,
)
from enclave.attestation.sim import SIMULATION_WARNING

EPILOG = """\
Nothing leaves this machine until the enclave is verified (as custos-query
does for a classifier): then the prompt is sent, and the answer streams back.

Ctrl-C stops an answer: the enclave stops at once and charges only the
tokens it produced. A deployment's quota is in tokens, prompt and completion
both charged; when it runs out mid-answer, the answer ends there (finish
reason quota, exit 4).

exit codes:
  0  success
  1  other errors (enclave not listening or unreachable, busy, input refused)
  2  misuse of the command line
  3  verification refused (nothing was sent)
  4  quota exhausted (also an answer cut short by it)
  5  deployment suspended or revoked
  130  interrupted (Ctrl-C) in a one-prompt call

examples:
  custos-query chat --enclave enclave.example:8443 --manifest end-user.toml "Why is the sky blue?"
  custos-query chat --enclave 127.0.0.1:8443 --manifest end-user.toml --json --max-tokens 64 "Hi"
  custos-query chat --enclave 127.0.0.1:8443 --manifest end-user.toml --system "Answer briefly."
"""
INTERRUPTED = 130


def _bounded_int(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}")
        return value

    return parse


def _bounded_float(low: float, high: float, *, above_low: bool = False) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low < value if above_low else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(
                f"must be {'above' if above_low else 'from'} {low:g} to {high:g}"
            )
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="custos-query chat",
        description="Verify a Custos enclave against a manifest, then chat with its language model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_arguments(parser, address=_address, seconds=_seconds)
    parser.add_argument(
        "prompt",
        nargs="?",
        metavar="PROMPT",
        help="what to ask; left out: a conversation, one line of standard input per turn",
    )
    parser.add_argument("--system", metavar="TEXT", help="a system message before the conversation")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="send PROMPT (or each line) as a raw prompt, without the model's chat template",
    )
    parser.add_argument(
        "--max-tokens",
        metavar="N",
        type=_bounded_int(0, (1 << 32) - 1),
        default=0,
        help="most tokens to generate per answer, 0 to the end of the model's context (default 0)",
    )
    parser.add_argument(
        "--temperature",
        metavar="T",
        type=_bounded_float(0, MAX_TEMPERATURE),
        help=f"0 (greedy) to {MAX_TEMPERATURE:g} (default: 1)",
    )
    parser.add_argument(
        "--top-p",
        metavar="P",
        type=_bounded_float(0, 1, above_low=True),
        help="above 0, at most 1 (default 1)",
    )
    parser.add_argument(
        "--top-k", metavar="K", type=_bounded_int(0, MAX_TOP_K), default=0, help="0 (no limit) to 1000"
    )
    parser.add_argument(
        "--seed", metavar="N", type=_bounded_int(0, MAX_SEED), help="for a repeatable answer (default: fresh)"
    )
    parser.add_argument(
        "--stop",
        metavar="TEXT",
        action="append",
        default=[],
        help=f"end the answer before this text (repeatable, up to {MAX_STOP_STRINGS})",
    )
    return parser


class Chat:
    """One verified connection, the conversation so far, and how answers are shown."""

    def __init__(
        self, args: argparse.Namespace, connection: Connection, verification: dict[str, Any]
    ) -> None:
        self._args = args
        self._connection = connection
        self._verification = verification
        self.history: list[Message] = [{"role": "system", "content": args.system}] if args.system else []

    def ask(self, text: str, out: TextIO) -> int:
        """One turn: stream the answer (text mode) or print its JSON; the exit status it earns."""
        args = self._args
        if args.raw:
            answer = self._generate(prompt=text)
        else:
            answer = self._generate(messages=[*self.history, {"role": "user", "content": text}])
        with answer:
            try:
                for delta in answer:
                    if not args.json:
                        out.write(_printable(delta.text))
                        out.flush()
            except KeyboardInterrupt:
                answer.cancel()
        usage = answer.usage
        assert usage is not None
        if not args.raw and usage.finish_reason != "cancelled":
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.text}]
        if args.json:
            print(json.dumps(self._doc(answer), indent=None if args.prompt is None else 2), file=out)
        else:
            out.write("\n")
            out.flush()
            counted = f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
            left = f", {usage.remaining_quota} left" if usage.finish_reason != "cancelled" else ""
            print(f"({usage.finish_reason}: {counted}{left})", file=sys.stderr, flush=True)
        if usage.finish_reason == "cancelled":
            return INTERRUPTED
        return 4 if usage.finish_reason == "quota" else 0

    def _generate(self, **what: Any) -> Generation:
        args = self._args
        return self._connection.generate(
            **what,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop,
        )

    def _doc(self, answer: Generation) -> dict[str, Any]:
        usage = answer.usage
        assert usage is not None
        doc: dict[str, Any] = {
            "enclave": self._args.enclave,
            "deployment": self._connection.deployment,
            "verified": True,
            "verification": self._verification,
            "simulated": self._connection.simulated,
            "text": answer.text,
            "finish_reason": usage.finish_reason,
            "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
            "remaining_quota": usage.remaining_quota,
            "model_sha384": self._connection.model_sha384,
        }
        if self._connection.simulated:
            doc["warning"] = SIMULATION_WARNING
        return doc


def _printable(text: str) -> str:
    """Model output as a terminal may show it: control characters escaped, line breaks and tabs kept."""
    return "".join(c if c.isprintable() or c in "\n\t" else ascii(c)[1:-1] for c in text)


def _run(args: argparse.Namespace, talked_to: dict[str, str]) -> int:
    if args.prompt is not None and not args.prompt:
        raise InvalidInputError("prompt is empty")
    manifest = load_manifest(args.manifest)
    with connect(
        args.enclave, manifest, timeout=args.timeout, collateral=_collateral(args.pccs), amd_kds=args.amd_kds
    ) as connection:
        talked_to.update(enclave=args.enclave, deployment=connection.deployment)
        verification = _verification_doc(connection, manifest)
        if not args.json:
            print(_verification_text(args.enclave, verification), file=sys.stderr, flush=True)
        chat = Chat(args, connection, verification)
        if args.prompt is not None:
            return chat.ask(args.prompt, sys.stdout)
        return _converse(chat)


def _converse(chat: Chat) -> int:
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            return 0
        if not line:
            return 0
        line = line.rstrip("\n")
        if line.strip():
            status = chat.ask(line, sys.stdout)
            if status not in (0, INTERRUPTED):
                return status


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not args.enclave:
        parser().error("--enclave is required (or set CUSTOS_ENCLAVE)")
    if args.manifest is None:
        parser().error("--manifest is required (or set CUSTOS_MANIFEST)")
    if len(args.stop) > MAX_STOP_STRINGS:
        parser().error(f"at most {MAX_STOP_STRINGS} --stop strings")
    if args.raw and args.system is not None:
        parser().error("--system is a chat message: it does not go with --raw")
    talked_to: dict[str, str] = {}
    try:
        return _run(args, talked_to)
    except ClientError as exc:
        return _failure(exc, as_json=args.json, verbose=args.verbose, talked_to=talked_to)
    except KeyboardInterrupt:
        return INTERRUPTED
