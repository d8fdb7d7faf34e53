"""Reaching the admin API from the console: the local socket, or TCP with an admin certificate.

``custodian admin-cert NAME --out DIR`` (over the unix socket) writes
``DIR/NAME.key`` (0600, generated here and never sent), ``DIR/NAME.pem`` and
``DIR/custodian-ca.pem``; with them any console command can go to a custodian
serving ``--admin-listen``: ``custodian --admin HOST:PORT --admin-key
DIR/NAME.key --admin-cert DIR/NAME.pem --custodian-ca DIR/custodian-ca.pem
usage``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

from custodian._cli_args import whole_number
from custodian._cli_audit import emit
from custodian.admin_access import DEFAULT_ADMIN_CERT_DAYS, MAX_ADMIN_CERT_DAYS
from custodian.console import Console, RemoteAdmin
from custodian.data_dir import write_private
from custodian.errors import ConsoleError
from custodian.output_file import write_replacing
from enclave.identity import private_key_pem

_REMOTE = (
    (
        "--admin",
        "CUSTODIAN_ADMIN",
        "HOST:PORT",
        "the custodian's admin TCP listener (default: DATA/admin.sock)",
    ),
    ("--admin-key", "CUSTODIAN_ADMIN_KEY", "FILE", "private key from `custodian admin-cert`"),
    ("--admin-cert", "CUSTODIAN_ADMIN_CERT", "FILE", "certificate from `custodian admin-cert`"),
    ("--custodian-ca", "CUSTODIAN_CA", "FILE", "the custodian TLS CA (PEM) the admin listener chains to"),
)


def add_remote_options(parser: argparse.ArgumentParser, *, here: bool) -> None:
    """The TCP admin options, accepted before and after the command (defaults on the top level only)."""
    for flag, env, metavar, text in _REMOTE:
        default: object = os.environ.get(env) or None if here else argparse.SUPPRESS
        parser.add_argument(flag, default=default, metavar=metavar, help=f"{text} (env {env})")


# Commands that never go to a remote custodian: with --admin they are refused, never run locally.
LOCAL_ONLY = {
    "serve": "serve runs the custodian here; --admin is for console commands",
    "admin-cert": "admin-cert is issued over the custodian's unix socket only: run it on the custodian's"
    " host, without --admin",
    "console": "console login asks the custodian's DATA/console.sock: run it on the custodian's host,"
    " without --admin",
}


def check_remote_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    given = [getattr(args, flag[2:].replace("-", "_")) is not None for flag, *_ in _REMOTE]
    if any(given) and not all(given):
        parser.error("--admin needs --admin-key, --admin-cert and --custodian-ca (and they need --admin)")
    if args.admin is not None and args.command in LOCAL_ONLY:
        parser.error(LOCAL_ONLY[args.command])


def console_for(args: argparse.Namespace) -> Console:
    if args.admin is None:
        return Console(args.data / "admin.sock")
    return Console(args.data / "admin.sock", remote=remote_admin(args))


def remote_admin(args: argparse.Namespace) -> RemoteAdmin:
    """The --admin credentials, read and checked against each other before any connection."""
    key_pem, certificate_pem, ca_pem = _read(args.admin_key), _read(args.admin_cert), _read(args.custodian_ca)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        hint = " (are --admin-key and --admin-cert swapped?)" if b"CERTIFICATE-----" in key_pem else ""
        raise ConsoleError(
            f"--admin-key {args.admin_key} holds no unencrypted PEM private key{hint}"
        ) from None
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError:
        raise ConsoleError(f"--admin-cert {args.admin_cert} holds no PEM certificate") from None
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise ConsoleError(f"--custodian-ca {args.custodian_ca} holds no PEM certificate") from None
    if _spki(key.public_key()) != _spki(certificate.public_key()):
        raise ConsoleError(
            f"the key in --admin-key {args.admin_key} does not match the certificate in"
            f" --admin-cert {args.admin_cert}"
        )
    return RemoteAdmin(
        address=args.admin,
        key_pem=key_pem,
        certificate_pem=certificate_pem,
        custodian_ca_pem=ca_pem,
        custodian_ca_file=args.custodian_ca,
    )


def add_admin_cert_command(commands: Any, common: argparse.ArgumentParser) -> None:
    cert = commands.add_parser(
        "admin-cert",
        parents=[common],
        help="issue a client certificate for the admin TCP listener (over the unix socket only)",
    )
    cert.add_argument(
        "name",
        help="who holds it, 1-64 letters, digits, '.', '_' or '-'; the origin recorded for every action"
        " taken with it",
    )
    cert.add_argument(
        "--out",
        type=Path,
        required=True,
        help="directory for NAME.key, NAME.pem, custodian-ca.pem (NAME.key and NAME.pem must not exist)",
    )
    cert.add_argument(
        "--days",
        type=whole_number(1, MAX_ADMIN_CERT_DAYS),
        default=DEFAULT_ADMIN_CERT_DAYS,
        help=f"validity in days, 1 to {MAX_ADMIN_CERT_DAYS} (default %(default)s)",
    )
    cert.set_defaults(run=_admin_cert)


def _admin_cert(args: argparse.Namespace) -> None:
    key_path, cert_path, ca_path = (
        args.out / f"{args.name}.key",
        args.out / f"{args.name}.pem",
        args.out / "custodian-ca.pem",
    )
    # Claim the output files before the custodian issues (and audits) anything: a certificate
    # whose key could not be kept would be issued for nothing.
    if cert_path.exists() or cert_path.is_symlink():
        raise ConsoleError(f"{cert_path} exists; remove it or choose another --out")
    args.out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        write_private(key_path, private_key_pem(key))
    except FileExistsError:
        raise ConsoleError(f"{key_path} exists; remove it or choose another --out") from None
    try:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.name)]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        with Console(args.data / "admin.sock") as console:
            issued = console.issue_admin_certificate(args.name, csr, days=args.days)
        _write_new(cert_path, issued.certificate)
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise
    write_replacing(ca_path, issued.custodian_ca)  # another administrator's files may hold it
    files = {"key": str(key_path), "certificate": str(cert_path), "custodian_ca": str(ca_path)}
    emit(
        args,
        files,
        f"admin certificate for {args.name} in {args.out}; use it with\n"
        f"  custodian --admin HOST:PORT --admin-key {key_path} --admin-cert {cert_path}"
        f" --custodian-ca {ca_path} COMMAND",
    )


def _spki(public: PublicKeyTypes | CertificatePublicKeyTypes) -> bytes:
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_new(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise ConsoleError(f"{path} exists; remove it or choose another --out") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConsoleError(f"cannot read {path}: {exc.strerror}") from None
