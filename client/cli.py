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

from client.api import (
    DEFAULT_TIMEOUT,
    MAX_TOP_K,
    Connection,
    InferResult,
    connect,
    load_manifest,
    read_image,
)
from client.errors import ClientError, VerificationRefusedError
from enclave.attestation import ReferenceValues
from enclave.attestation.sim import SIMULATION_WARNING
from enclave.collateral._http import check_base_url
from enclave.collateral.amd_kds import DEFAULT_KDS_URL

EPILOG = """\
Nothing leaves this machine until the enclave is verified: the evidence in its
TLS certificate is checked against the manifest (platform, code and
configuration measurements, custodian CA, allowed models), that certificate is
pinned, and fresh evidence over a nonce of ours is checked on the pinned channel.

exit codes:
  0  success
  1  other errors (unreadable input or manifest, enclave unreachable, input refused)
  2  misuse of the command line
  3  verification refused (nothing was sent)
  4  quota exhausted
  5  deployment suspended or revoked

examples:
  custos-query --enclave enclave.example:8443 --manifest end-user.toml digit.png
  CUSTOS_ENCLAVE=127.0.0.1:8443 CUSTOS_MANIFEST=end-user.toml custos-query --json --top 3 digit.png
"""


def _top_k(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= MAX_TOP_K:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_TOP_K}")
    return value


def kds_url(text: str) -> str | None:
    """``--amd-kds``: an http(s) base URL, or ``off`` (None)."""
    if text == "off":
        return None
    try:
        return check_base_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600 seconds")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="custos-query",
        description="Verify a Custos enclave against a manifest, then classify an image with its model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--enclave",
        metavar="HOST:PORT",
        default=os.environ.get("CUSTOS_ENCLAVE"),
        help="the enclave's inference address (default: $CUSTOS_ENCLAVE)",
    )
    parser.add_argument(
        "--manifest",
        metavar="FILE",
        type=Path,
        default=os.environ.get("CUSTOS_MANIFEST"),
        help="the manifest (TOML reference values) from the custodian (default: $CUSTOS_MANIFEST)",
    )
    parser.add_argument("input", type=Path, metavar="INPUT", help="the image to classify (PNG or JPEG)")
    parser.add_argument(
        "--top", metavar="K", type=_top_k, default=3, help="how many classes to show (default 3)"
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"limit for each network step (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--amd-kds",
        metavar="URL",
        type=kds_url,
        default=os.environ.get("CUSTOS_AMD_KDS") or DEFAULT_KDS_URL,
        help="sev-snp: fetch AMD's CRL (and the certificates the evidence lacks) from this KDS; 'off' uses"
        " only what the evidence carries (default: $CUSTOS_AMD_KDS, else %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (also on failure)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step; tracebacks on failure")
    return parser


def _verification_doc(connection: Connection, manifest: ReferenceValues) -> dict[str, Any]:
    claims = connection.appraisal.claims
    code = claims.events("code")[0].sha384.hex()
    return {
        "platform": connection.appraisal.platform.platform,
        "simulated": connection.simulated,
        "code_sha384": code,
        "custodian_ca_sha256": manifest.custodian_ca_sha256,
        "model_sha384": connection.model_sha384,
        "deployment": claims.deployment,
        "key_sha256": connection.key_sha256,
    }


def _verification_text(address: str, doc: dict[str, Any]) -> str:
    lines = [
        f"enclave {address} verified against the manifest (no input was sent before this)",
        f"  platform    {doc['platform']}",
    ]
    if doc["simulated"]:
        lines.append(f"  !!! {SIMULATION_WARNING} !!!")
    lines += [
        f"  code        sha384 {doc['code_sha384'][:32]}… matches",
        f"  custodian   CA sha256 {doc['custodian_ca_sha256'][:32]}… pinned by the enclave, matches",
        f"  model       sha384 {doc['model_sha384'][:32]}… allowed",
        f"  freshness   evidence over our nonce, key sha256 {doc['key_sha256'][:32]}…",
    ]
    return "\n".join(lines)


def _result_doc(result: InferResult) -> dict[str, Any]:
    return {
        "top": [{"index": p.index, "label": p.label, "score": p.score} for p in result.top],
        "remaining_quota": result.remaining_quota,
        "model_sha384": result.model_sha384,
    }


def _result_text(result: InferResult) -> str:
    width = max((len(p.label) for p in result.top), default=0)
    lines = [f"top {len(result.top)}:"]
    lines += [
        f"  {rank}. {p.label or '(no label)':<{width}}  {p.score:7.2%}  (class {p.index})"
        for rank, p in enumerate(result.top, start=1)
    ]
    lines.append(f"remaining quota: {result.remaining_quota}")
    return "\n".join(lines)


def _failure(error: ClientError, *, as_json: bool, verbose: bool) -> int:
    reason = str(error)
    if isinstance(error, VerificationRefusedError):
        reason = f"verification refused, nothing was sent: {reason}"
    if as_json:
        doc = {"error": type(error).__name__, "reason": reason, "exit_code": error.exit_code}
        print(json.dumps(doc, indent=2))
    else:
        print(f"custos-query: {reason}", file=sys.stderr)
    if verbose:
        logging.getLogger(__name__).error("%s", error.diagnostics(), exc_info=error)
    return error.exit_code


def _run(args: argparse.Namespace) -> int:
    image = read_image(args.input)
    manifest = load_manifest(args.manifest)
    with connect(args.enclave, manifest, timeout=args.timeout, amd_kds=args.amd_kds) as connection:
        verification = _verification_doc(connection, manifest)
        if not args.json:
            print(_verification_text(args.enclave, verification), flush=True)
        result = connection.infer_image(image, top_k=args.top)
    if args.json:
        doc = {
            "enclave": args.enclave,
            "verified": True,
            "verification": verification,
            "simulated": result.simulated,
            **_result_doc(result),
        }
        if result.simulated:
            doc["warning"] = SIMULATION_WARNING
        print(json.dumps(doc, indent=2))
    else:
        print(_result_text(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.enclave:
        parser.error("--enclave is required (or set CUSTOS_ENCLAVE)")
    if args.manifest is None:
        parser.error("--manifest is required (or set CUSTOS_MANIFEST)")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    # The summary shows a simulated platform itself; the log repeats it with --verbose.
    root.setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    try:
        return _run(args)
    except ClientError as exc:
        return _failure(exc, as_json=args.json, verbose=args.verbose)
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)


if __name__ == "__main__":
    sys.exit(main())
