"""custos-verify: show and check a piece of TEE evidence, for people.

Exit codes: 0 verified (and, with --manifest, every reference value met),
3 refused, 1 other errors (unreadable file), 2 misuse. The claims are printed
in both the verified and the refused case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from client.api import load_manifest
from client.cli import kds_url
from client.errors import ClientError
from client.evidence import (
    EvidenceReport,
    TpmInputs,
    check_dcap,
    check_sev_snp,
    check_tpm,
    compare_registers,
    dcap_collateral,
    refused,
)
from enclave.collateral._http import CollateralServiceError
from enclave.collateral.amd_kds import DEFAULT_KDS_URL, AmdKds
from enclave.errors import EnclaveError

EPILOG = """\
examples:
  custos-verify --platform tdx quote.bin --collateral tdx_quote_collateral.json --at 2025-07-01T00:00:00Z
  custos-verify --platform sev-snp report.bin --certs vcek.der --certs ask_ark.pem [--collateral crl.der]
  custos-verify --platform sev-snp report.bin --amd-kds      # VCEK, chain and CRL from AMD KDS
  custos-verify --platform tpm --quote q.bin --signature s.bin --ak ak.pem --pcrs pcrs.json --nonce 00ff

DCAP collateral files are recognised by content (PCS tcbInfo / enclaveIdentity
JSON, or dcap-qvl's combined collateral JSON); name the others: NAME=FILE with
NAME one of tcb_info_issuer_chain, qe_identity_issuer_chain, root_ca_crl,
pck_crl, pck_crl_issuer_chain. Collateral that is not given is reported as not
checked. For SEV-SNP, --collateral names AMD's CRL ([crl=]FILE).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="custos-verify",
        description="Parse and verify TEE evidence (TDX, SGX, SEV-SNP, TPM 2.0) and print its claims.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--platform", required=True, choices=("tdx", "sgx", "sev-snp", "tpm"))
    parser.add_argument("evidence", nargs="?", type=Path, help="quote or report file (raw, hex or 0x-hex)")
    parser.add_argument("--collateral", action="append", default=[], metavar="[NAME=]FILE")
    parser.add_argument(
        "--certs",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="certificates: the VCEK then its chain (SEV-SNP); CA certificates (TPM)",
    )
    parser.add_argument(
        "--amd-kds",
        metavar="URL",
        nargs="?",
        type=kds_url,
        const=DEFAULT_KDS_URL,
        help="SEV-SNP: fetch the CRL, and the certificates not given, from this AMD KDS"
        f" (without URL: {DEFAULT_KDS_URL})",
    )
    parser.add_argument("--at", help="verification time, ISO 8601 (default: now)")
    parser.add_argument("--manifest", type=Path, help="manifest whose platform and registers must match")
    parser.add_argument("--quote", type=Path, help="TPM: TPMS_ATTEST file")
    parser.add_argument("--signature", type=Path, help="TPM: TPMT_SIGNATURE file")
    parser.add_argument("--ak", type=Path, help="TPM: AK as PEM/DER SubjectPublicKeyInfo or TPMT_PUBLIC")
    parser.add_argument("--pcrs", type=Path, help='TPM: PCR values JSON {"sha256": {"0": "hex", ...}}')
    parser.add_argument("--nonce", help="TPM: expected qualifying data, hex")
    parser.add_argument("--ak-cert", type=Path, help="TPM: AK certificate (chained to --certs roots)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


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
    lines += ["claims:", json.dumps(report.claims, indent=2, sort_keys=True)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.nonce is not None:
        try:
            bytes.fromhex(args.nonce)
        except ValueError:
            parser.error("--nonce must be hex")
    now = _time(args.at, parser)
    try:
        report = _check(args, parser, now)
        if args.manifest is not None and report.verified:
            compare_registers(report, load_manifest(args.manifest))
    except (OSError, EnclaveError, ClientError) as exc:
        print(f"custos-verify: {exc}", file=sys.stderr)
        return 1
    doc: dict[str, Any] = report.to_json()
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else _text(report))
    return 0 if doc["verified"] else 3


if __name__ == "__main__":
    sys.exit(main())
