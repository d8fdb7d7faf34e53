"""custos-query: verify an enclave against a manifest, then classify one image.

Exit codes: 0 success, 3 verification refused (nothing sent), 4 quota
exhausted, 5 suspended or revoked, 1 other errors, 2 misuse.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from client.api import MAX_INPUT_BYTES, Connection, InferResult, connect
from client.errors import ClientError, InvalidInputError
from enclave.attestation.sim import SIMULATION_WARNING

EPILOG = """\
The enclave is checked before INPUT leaves this machine: its certificate's
evidence against the manifest (platform, code and configuration measurements,
custodian CA, allowed models), then fresh evidence over a nonce of ours on the
pinned channel.

exit codes: 0 success, 3 verification refused (nothing sent), 4 quota exhausted,
5 suspended or revoked, 1 other errors, 2 misuse
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="custos-query",
        description="Verify a Custos enclave, then classify an image with the model it serves.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--enclave",
        default=os.environ.get("CUSTOS_ENCLAVE"),
        help="enclave inference address HOST:PORT (env CUSTOS_ENCLAVE)",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        default=os.environ.get("CUSTOS_MANIFEST"),
        help="manifest (TOML) of expected measurements, from the custodian (env CUSTOS_MANIFEST)",
    )
    parser.add_argument("input", type=Path, metavar="INPUT", help="image file (PNG or JPEG)")
    parser.add_argument("--top", type=int, default=3, help="how many classes to print (default 3)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details and tracebacks")
    return parser


def _read_input(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise InvalidInputError(f"{path} is {size} bytes, over the {MAX_INPUT_BYTES}-byte limit")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from exc


def _verified_text(connection: Connection) -> str:
    platform = connection.appraisal.platform.platform
    lines = []
    if connection.simulated:
        lines.append(f"WARNING: {SIMULATION_WARNING}")
    lines.append(
        f"verified enclave: platform {platform}, code and configuration match the manifest, "
        f"model {connection.model_sha384[:16]}… allowed"
    )
    return "\n".join(lines)


def _result_doc(connection: Connection, result: InferResult) -> dict[str, Any]:
    return {
        "verified": True,
        "platform": connection.appraisal.platform.platform,
        "simulated": connection.simulated,
        "model_sha384": result.model_sha384,
        "top": [{"index": p.index, "label": p.label, "score": p.score} for p in result.top],
        "remaining_quota": result.remaining_quota,
    }


def _result_text(result: InferResult) -> str:
    lines = [f"  {p.label:>10}  {p.score:6.1%}" for p in result.top]
    return "\n".join(["prediction:", *lines, f"remaining quota: {result.remaining_quota}"])


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.enclave:
        parser.error("--enclave is required (or set CUSTOS_ENCLAVE)")
    if args.manifest is None:
        parser.error("--manifest is required (or set CUSTOS_MANIFEST)")
    if args.top < 1:
        parser.error("--top must be at least 1")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(message)s"
    )
    try:
        data = _read_input(args.input)
        with connect(args.enclave, args.manifest, timeout=args.timeout) as connection:
            if not args.json:
                print(_verified_text(connection), flush=True)
            result = connection.infer_image(data, top_k=args.top)
            if args.json:
                print(json.dumps(_result_doc(connection, result), indent=2))
            else:
                print(_result_text(result))
    except ClientError as exc:
        if args.verbose:
            logging.exception("query failed")
        if args.json:
            doc = {"error": type(exc).__name__, "reason": str(exc), "exit_code": exc.exit_code}
            print(json.dumps(doc, indent=2))
        else:
            print(f"custos-query: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
