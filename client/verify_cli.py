"""custos-verify: show and check a piece of TEE evidence, for people.

Exit codes: 0 verified (and, with --manifest, every reference value met),
3 refused, 1 other errors (unreadable file; standard output closed early), 2 misuse. The claims are printed
in both the verified and the refused case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

from client.api import load_manifest
from client.errors import ClientError
from client.evidence import (
    EvidenceReport,
    TpmInputs,
    check_dcap,
    check_nitro,
    check_sev_snp,
    check_tpm,
    compare_registers,
    dcap_collateral,
    refused,
)
from enclave.attestation.dcap import COLLATERAL_NAMES
from enclave.attestation.dcap_quote import decode_quote_text
from enclave.collateral._http import CollateralServiceError, service_url_argument
from enclave.collateral.amd_kds import DEFAULT_KDS_URL, AmdKds
from enclave.collateral.cache import CollateralCache
from enclave.collateral.intel import CollateralUnavailableError, IntelCollateral
from enclave.collateral.intel_pcs import INTEL_PCS_URL, IntelPcs, pccs_argument
from enclave.errors import EnclaveError

EPILOG = """\
exit codes:
  0  verified (and, with --manifest, every reference value met)
  1  other errors (unreadable file, standard output closed early as by `| head`)
  2  misuse of the command line (also: an option the --platform does not take)
  3  refused (the claims are printed all the same)

examples:
  custos-verify --platform tdx quote.bin --collateral tdx_quote_collateral.json --at 2025-07-01T00:00:00Z
  custos-verify --platform sev-snp report.bin --certs vcek.der --certs ask_ark.pem [--collateral crl.der]
  custos-verify --platform sev-snp report.bin --amd-kds      # VCEK, chain and CRL from AMD KDS
  custos-verify --platform tpm --quote q.bin --signature s.bin --ak ak.pem --pcrs pcrs.json --nonce 00ff
  custos-verify --platform nitro attestation.b64 --manifest enclave.toml   # checked at its own time

DCAP collateral files are recognised by content: PCS tcbInfo / enclaveIdentity
JSON, dcap-qvl's combined collateral JSON, CRLs (DER or PEM) by their issuer
(Root CA or PCK CA), issuer chains (PEM) by their first certificate (TCB
Signing, PCK CA); or name them: NAME=FILE. --pccs [URL] fetches what the quote
needs. Collateral that is not given is reported as not checked. For SEV-SNP,
--collateral names AMD's CRL ([crl=]FILE); --amd-kds [URL] fetches the CRL and
the certificates not given. A Nitro attestation document (raw CBOR or base64)
is checked at its own timestamp unless --at names another time; its
certificates live about three hours.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="custos-verify",
        description="Parse and verify TEE evidence (TDX, SGX, SEV-SNP, TPM 2.0, AWS Nitro) and print its"
        " claims.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--platform",
        required=True,
        choices=("tdx", "sgx", "sev-snp", "tpm", "nitro"),
        help="the kind of evidence (required); it decides which other options apply",
    )
    parser.add_argument(
        "evidence",
        nargs="?",
        type=Path,
        metavar="EVIDENCE",
        help="tdx, sgx, sev-snp: the quote or attestation report file (raw bytes, hex or 0x-hex); "
        "nitro: the attestation document (raw CBOR or base64), of Nitro Enclaves or NitroTPM; "
        "tpm takes --quote, --signature and --ak instead",
    )
    parser.add_argument(
        "--collateral",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="tdx, sgx: DCAP collateral, repeatable (default: none; what it would check is reported "
        "as not checked)",
    )
    parser.add_argument(
        "--pccs",
        nargs="?",
        const=INTEL_PCS_URL,
        type=pccs_argument,
        metavar="URL",
        help="tdx, sgx: fetch the collateral the quote needs from this PCS or PCCS (no URL: Intel's);"
        " --collateral files take precedence",
    )
    parser.add_argument(
        "--certs",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="sev-snp: the VCEK, then its chain (ASK, ARK); tpm: the CA certificates --ak-cert must "
        "chain to; repeatable (default: none)",
    )
    parser.add_argument(
        "--at",
        metavar="TIME",
        help="verification time, ISO 8601 (default: now; nitro: the document's own timestamp)",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        metavar="FILE",
        help="a manifest whose platform and registers the evidence must also meet (default: none)",
    )
    parser.add_argument("--quote", type=Path, metavar="FILE", help="tpm (required): the TPMS_ATTEST file")
    parser.add_argument(
        "--signature", type=Path, metavar="FILE", help="tpm (required): the TPMT_SIGNATURE file"
    )
    parser.add_argument(
        "--ak",
        type=Path,
        metavar="FILE",
        help="tpm (required): the AK, PEM/DER SubjectPublicKeyInfo or TPMT_PUBLIC",
    )
    parser.add_argument(
        "--pcrs",
        type=Path,
        metavar="FILE",
        help='tpm: the values of the PCRs the quote selects, JSON {"sha256": {"0": "HEX", ...}} '
        "(default: none, enough only for a quote that selects no PCR)",
    )
    parser.add_argument(
        "--nonce",
        metavar="HEX",
        help="tpm: the expected qualifying data; nitro: the expected document nonce (default: none;"
        " freshness is reported as not checked)",
    )
    parser.add_argument(
        "--ak-cert",
        type=Path,
        metavar="FILE",
        help="tpm: the AK's certificate, chained to the --certs roots (default: none; that the AK lives "
        "in a TPM is reported as not checked)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object, also on failure (default: text)"
    )
    parser.add_argument(
        "--amd-kds",
        metavar="URL",
        nargs="?",
        type=service_url_argument,
        const=DEFAULT_KDS_URL,
        help="sev-snp: fetch the CRL, and the certificates not given, from this AMD KDS"
        f" (without URL: {DEFAULT_KDS_URL}; default: none)",
    )
    return parser


# The options each platform reads; any other given is a mistake, not something to ignore.
_PLATFORM_INPUTS = {
    "tdx": {"evidence", "collateral", "pccs"},
    "sgx": {"evidence", "collateral", "pccs"},
    "sev-snp": {"evidence", "certs", "collateral", "amd_kds"},
    "tpm": {"quote", "signature", "ak", "pcrs", "nonce", "ak_cert", "certs"},
    "nitro": {"evidence", "nonce"},
}


def _check_usage(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    inputs = set().union(*_PLATFORM_INPUTS.values())
    given = sorted(dest for dest in inputs - _PLATFORM_INPUTS[args.platform] if getattr(args, dest))
    if given:
        flags = ", ".join(
            "EVIDENCE" if dest == "evidence" else "--" + dest.replace("_", "-") for dest in given
        )
        parser.error(f"--platform {args.platform} does not take {flags}")
    for spec in args.collateral if args.platform in ("tdx", "sgx") else ():
        name, sep, _ = spec.partition("=")
        if sep and name not in COLLATERAL_NAMES:
            parser.error(f"--collateral {name}=FILE: NAME must be one of {', '.join(COLLATERAL_NAMES)}")
    if args.nonce is not None:
        try:
            bytes.fromhex(args.nonce)
        except ValueError:
            parser.error("--nonce must be hex")


def _time(text: str | None, parser: argparse.ArgumentParser) -> datetime.datetime:
    if text is None:
        return datetime.datetime.now(datetime.UTC)
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        parser.error(f"--at {text!r} is not an ISO 8601 time")
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def _collateral_files(specs: list[str]) -> list[tuple[str | None, bytes]]:
    files: list[tuple[str | None, bytes]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        files.append((name, Path(path).read_bytes()) if sep else (None, Path(spec).read_bytes()))
    return files


def _fetched(pccs_url: str, evidence: bytes) -> dict[str, bytes]:
    """What the quote needs, from the service (a failure to fetch is an error, not a refusal)."""
    intel = IntelCollateral(CollateralCache(None), IntelPcs(pccs_url))
    try:
        return intel.for_quote(decode_quote_text(evidence))
    except CollateralUnavailableError as exc:
        raise ClientError(f"cannot fetch the collateral: {exc}") from None


def _amd_crl(files: list[tuple[str | None, bytes]], parser: argparse.ArgumentParser) -> bytes | None:
    if any(name not in (None, "crl") for name, _ in files) or len(files) > 1:
        parser.error("--platform sev-snp takes one --collateral: AMD's CRL ([crl=]FILE)")
    return files[0][1] if files else None


def _check(
    args: argparse.Namespace, parser: argparse.ArgumentParser, now: datetime.datetime
) -> EvidenceReport:
    if args.platform == "tpm":
        if not (args.quote and args.signature and args.ak):
            parser.error("--platform tpm needs --quote, --signature and --ak")
        inputs = TpmInputs(
            quote=args.quote.read_bytes(),
            signature=args.signature.read_bytes(),
            ak=args.ak.read_bytes(),
            pcrs=args.pcrs.read_bytes() if args.pcrs else None,
            nonce=bytes.fromhex(args.nonce) if args.nonce else None,
            ak_cert=args.ak_cert.read_bytes() if args.ak_cert else None,
            certs=[c.read_bytes() for c in args.certs],
        )
        try:
            return check_tpm(inputs, now=now)
        except EnclaveError as exc:
            return refused("tpm", exc, inputs.quote)
    if args.evidence is None:
        parser.error(f"--platform {args.platform} needs an EVIDENCE file")
    evidence = args.evidence.read_bytes()
    if args.platform == "nitro":
        try:
            return check_nitro(
                evidence,
                at=now if args.at is not None else None,
                nonce=bytes.fromhex(args.nonce) if args.nonce else None,
            )
        except EnclaveError as exc:
            return refused("nitro", exc, evidence)
    try:
        if args.platform == "sev-snp":
            return check_sev_snp(
                evidence,
                [c.read_bytes() for c in args.certs],
                now=now,
                crl=_amd_crl(_collateral_files(args.collateral), parser),
                kds=AmdKds(args.amd_kds) if args.amd_kds else None,
            )
        collateral = dcap_collateral(_collateral_files(args.collateral))
        if args.pccs is not None:
            collateral = {**_fetched(args.pccs, evidence), **collateral}
        return check_dcap(evidence, collateral, now=now, platform=args.platform)
    except CollateralServiceError:
        raise  # an unreachable service says nothing about the evidence: exit 1, not 3
    except EnclaveError as exc:
        return refused(args.platform, exc, evidence)


def _text(report: EvidenceReport) -> str:
    lines = [f"platform: {report.platform}"]
    lines.append(
        "VERIFIED"
        if report.verified and not report.mismatches
        else f"REFUSED: {report.error or 'manifest mismatch'}"
    )
    lines += [f"  mismatch: {m}" for m in report.mismatches]
    lines += ["checks done:", *(f"  - {c}" for c in report.checks_done)]
    if report.checks_not_done:
        lines += ["not checked:", *(f"  - {k}: {v}" for k, v in report.checks_not_done.items())]
    if report.platform.startswith("nitro-") and report.verified:
        lines += _nitro_summary(report.claims)
    lines += ["claims:", json.dumps(report.claims, indent=2, sort_keys=True)]
    return "\n".join(lines)


def _nitro_summary(claims: dict[str, Any]) -> list[str]:
    """Module, time, PCRs and chain of a Nitro document, for a person (the claims hold it all)."""
    lines = [
        f"module: {claims['module_id']}",
        f"time: {claims['timestamp']} ({claims['timestamp_ms']} ms)",
        f"{claims['pcrs_field']}:",
        *(f"  {index:>2}  {value}" for index, value in claims["pcrs"].items()),
        "chain (root first):",
    ]
    lines += [f"  - {c['subject']}  {c['not_before']} .. {c['not_after']}" for c in claims["chain"]]
    return lines


def _failure(error: Exception, *, as_json: bool) -> int:
    if isinstance(error, OSError):
        reason = f"cannot read {error.filename}: {error.strerror}" if error.filename else str(error)
    else:
        reason = str(error)
    if as_json:
        print(json.dumps({"error": type(error).__name__, "reason": reason, "exit_code": 1}, indent=2))
    else:
        print(f"custos-verify: {reason}", file=sys.stderr)
    return 1


def _verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    now = _time(args.at, parser)
    try:
        report = _check(args, parser, now)
        if args.manifest is not None and report.verified:
            manifest = load_manifest(args.manifest)
            compare_registers(report, manifest)
            for warning in manifest.warnings:
                print(f"WARNING: {warning}", file=sys.stderr)
    except (OSError, EnclaveError, ClientError) as exc:
        return _failure(exc, as_json=args.json)
    doc: dict[str, Any] = report.to_json()
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else _text(report))
    return 0 if doc["verified"] else 3


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_usage(args, parser)
    try:
        code = _verify(args, parser)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:
        # The reader left (`| head`): stop quietly, as the Python documentation advises; point
        # stdout at /dev/null so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
