"""custos-query: verify an enclave against a manifest, then classify one image.

``custos-query chat ...`` talks to a language model instead (``client.chat_cli``).

Exit codes: 0 success, 3 verification refused (nothing sent), 4 quota
exhausted, 5 suspended or revoked, 1 other errors, 2 misuse.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client import _grpc_log  # noqa: F401  (before anything imports grpc)
from client._transport import split_address
from client.api import (
    DEFAULT_TIMEOUT,
    MAX_INPUT_BYTES,
    MAX_TOP_K,
    CollateralSource,
    Connection,
    InferResult,
    connect,
    load_manifest,
    read_image,
)
from client.errors import ClientError, VerificationRefusedError
from enclave.attestation import ReferenceValues
from enclave.attestation.manifest import UNMEASURED_OS_WARNING
from enclave.attestation.sim import SIMULATION_WARNING
from enclave.collateral._http import service_url_argument
from enclave.collateral.amd_kds import DEFAULT_KDS_URL
from enclave.collateral.cache import CollateralCache
from enclave.collateral.intel import IntelCollateral
from enclave.collateral.intel_pcs import INTEL_PCS_URL, IntelPcs, pccs_argument

EPILOG = """\
Nothing leaves this machine until the enclave is verified: the evidence in its
TLS certificate is checked against the manifest (platform, code and
configuration measurements, custodian CA, allowed models), that certificate is
pinned, and fresh evidence over a nonce of ours is checked on the pinned channel.

exit codes:
  0  success
  1  other errors (unreadable input or manifest, enclave not listening or
     unreachable, input refused, standard output closed early as by `| head`)
  2  misuse of the command line
  3  verification refused (nothing was sent)
  4  quota exhausted
  5  deployment suspended or revoked

gRPC's own log is off below errors; GRPC_VERBOSITY=DEBUG turns it on.

A language model's deployment: custos-query chat --help.

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


def _address(text: str) -> str:
    try:
        split_address(text)
    except ClientError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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
    add_connection_arguments(parser, address=_address, seconds=_seconds)
    parser.add_argument(
        "input",
        type=Path,
        metavar="INPUT",
        help=f"the image to classify: a PNG or JPEG file of 1 byte to {MAX_INPUT_BYTES // 2**20} MiB, "
        "sent as is once the enclave is verified",
    )
    parser.add_argument(
        "--top",
        metavar="K",
        type=_top_k,
        default=3,
        help=f"how many classes to show, 1 to {MAX_TOP_K} (default 3)",
    )
    return parser


def add_connection_arguments(
    parser: argparse.ArgumentParser,
    *,
    address: Callable[[str], str] = _address,
    seconds: Callable[[str], float] = _seconds,
    output: bool = True,
) -> None:
    """The flags of every command that verifies an enclave: where it is, what it must be, output."""
    parser.add_argument(
        "--enclave",
        metavar="HOST:PORT",
        type=address,
        default=os.environ.get("CUSTOS_ENCLAVE") or None,
        help="the enclave's inference address, HOST:PORT or [IPv6]:PORT (default: $CUSTOS_ENCLAVE)",
    )
    parser.add_argument(
        "--manifest",
        metavar="FILE",
        type=Path,
        default=os.environ.get("CUSTOS_MANIFEST"),
        help="the manifest (TOML reference values) from the custodian (default: $CUSTOS_MANIFEST)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds,
        default=DEFAULT_TIMEOUT,
        help=f"limit for each network step, more than 0 and at most 3600 (default {DEFAULT_TIMEOUT:g})",
    )
    if output:
        parser.add_argument(
            "--json",
            action="store_true",
            help="print one JSON object on stdout, also on failure (default: text)",
        )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log each step; tracebacks on failure (default: off)"
    )
    parser.add_argument(
        "--pccs",
        metavar="URL|off",
        type=pccs_argument,
        default=os.environ.get("CUSTOS_PCCS") or INTEL_PCS_URL,
        help="tdx, sgx: where to fetch Intel collateral when the evidence does not carry it all"
        " (default: $CUSTOS_PCCS or Intel's PCS)",
    )
    parser.add_argument(
        "--amd-kds",
        metavar="URL|off",
        type=service_url_argument,
        default=os.environ.get("CUSTOS_AMD_KDS") or DEFAULT_KDS_URL,
        help="sev-snp: fetch AMD's CRL (and the certificates the evidence lacks) from this KDS; 'off' uses"
        " only what the evidence carries (default: $CUSTOS_AMD_KDS, else %(default)s)",
    )


def _verification_doc(connection: Connection, manifest: ReferenceValues) -> dict[str, Any]:
    claims = connection.appraisal.claims
    code = claims.events("code")[0].sha384.hex()
    return {
        "platform": connection.appraisal.platform.platform,
        "simulated": connection.simulated,
        "unmeasured_os": manifest.allow_unmeasured_os,
        "code_sha384": code,
        "custodian_ca_sha256": manifest.custodian_ca_sha256,
        "model_sha384": connection.model_sha384,
        "deployment": claims.deployment,
        "key_sha256": connection.key_sha256,
    }


def _verification_text(address: str, doc: dict[str, Any]) -> str:
    lines = [
        f"enclave {address} verified against the manifest (no input was sent before this)",
        f"  deployment  {_shown(doc['deployment'])}",
        f"  platform    {doc['platform']}",
    ]
    if doc["simulated"]:
        lines.append(f"  !!! {SIMULATION_WARNING} !!!")
    if doc["unmeasured_os"]:
        lines.append(f"  !!! {UNMEASURED_OS_WARNING} !!!")
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
    width = max((len(_shown(p.label)) for p in result.top), default=0)
    lines = [f"top {len(result.top)}:"]
    lines += [
        f"  {rank}. {_shown(p.label) or '(no label)':<{width}}  {p.score:7.2%}  (class {p.index})"
        for rank, p in enumerate(result.top, start=1)
    ]
    lines.append(f"remaining quota: {result.remaining_quota}")
    return "\n".join(lines)


def _shown(text: str) -> str:
    """Text from the enclave as a terminal may show it: control characters escaped."""
    return text if text.isprintable() else ascii(text)[1:-1]


def _failure(error: ClientError, *, as_json: bool, verbose: bool, talked_to: dict[str, str]) -> int:
    reason = str(error)
    if isinstance(error, VerificationRefusedError):
        reason = f"verification refused, nothing was sent: {reason}"
    if as_json:
        doc = {"error": type(error).__name__, "reason": reason, "exit_code": error.exit_code, **talked_to}
        print(json.dumps(doc, indent=2), flush=True)
    else:
        if "deployment" in talked_to:
            reason = f"deployment {_shown(talked_to['deployment'])}: {reason}"
        print(f"custos-query: {reason}", file=sys.stderr)
    if verbose:
        logging.getLogger(__name__).error("%s", error.diagnostics(), exc_info=error)
    return error.exit_code


def _collateral(pccs_url: str | None) -> CollateralSource | None:
    """Our own Intel collateral, fetched only for evidence that does not carry a complete set."""
    if pccs_url is None:
        return None
    intel = IntelCollateral(CollateralCache(None), IntelPcs(pccs_url))
    return functools.partial(intel.for_evidence, unless_carried=True)


def _run(args: argparse.Namespace, talked_to: dict[str, str]) -> int:
    """Verify, then query; ``talked_to`` gets the enclave and its deployment once verified."""
    image = read_image(args.input)
    manifest = load_manifest(args.manifest)
    with connect(
        args.enclave,
        manifest,
        timeout=args.timeout,
        collateral=_collateral(args.pccs),
        amd_kds=args.amd_kds,
    ) as connection:
        talked_to.update(enclave=args.enclave, deployment=connection.deployment)
        verification = _verification_doc(connection, manifest)
        if not args.json:
            print(_verification_text(args.enclave, verification), flush=True)
        result = connection.infer_image(image, top_k=args.top)
    if args.json:
        doc = {
            "enclave": args.enclave,
            "deployment": connection.deployment,
            "verified": True,
            "verification": verification,
            "simulated": result.simulated,
            **_result_doc(result),
        }
        if result.simulated:
            doc["warning"] = SIMULATION_WARNING
        if verification["unmeasured_os"]:
            doc["unmeasured_os_warning"] = UNMEASURED_OS_WARNING
        print(json.dumps(doc, indent=2))
    else:
        print(_result_text(result))
    sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    return 0


def _query(args: argparse.Namespace) -> int:
    talked_to: dict[str, str] = {}
    try:
        return _run(args, talked_to)
    except ClientError as exc:
        return _failure(exc, as_json=args.json, verbose=args.verbose, talked_to=talked_to)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chat"]:
        from client import chat_cli  # imported here: it imports this module

        return with_console_logging("-v" in argv or "--verbose" in argv, lambda: chat_cli.main(argv[1:]))
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.enclave:
        parser.error("--enclave is required (or set CUSTOS_ENCLAVE)")
    if args.manifest is None:
        parser.error("--manifest is required (or set CUSTOS_MANIFEST)")
    return with_console_logging(args.verbose, lambda: _query(args))


def with_console_logging(verbose: bool, work: Callable[[], int]) -> int:
    """Run a command with the log on standard error, and a reader that went away (`| head`) quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    # The summary shows a simulated platform itself; the log repeats it with --verbose.
    root.setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        return work()
    except BrokenPipeError:
        # The reader left (`| head`): stop quietly, as the Python documentation advises; point
        # stdout at /dev/null so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)


if __name__ == "__main__":
    sys.exit(main())
