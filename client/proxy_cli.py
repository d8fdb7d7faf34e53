"""custos-proxy: a local OpenAI-compatible server in front of one verified enclave.

Exit codes: 0 stopped, 1 cannot listen or other errors, 2 misuse, 3 the
enclave's verification refused at start (nothing listens then).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from ipaddress import ip_address

import uvicorn

from client import _grpc_log  # noqa: F401  (before anything imports grpc)
from client.api import connect, load_manifest
from client.cli import _collateral, add_connection_arguments
from client.errors import ClientError, VerificationRefusedError
from client.pinned_enclave import PinnedEnclave
from client.proxy import Proxy
from client.proxy_guard import BrowserGuard

logger = logging.getLogger("custos-proxy")

DEFAULT_LISTEN = "127.0.0.1:8000"
EPILOG = """\
The enclave is verified against the manifest before the first request is
accepted (as custos-query does), and the connection trusts exactly the
certificate verified. When the connection is lost the enclave is verified
again before anything else is sent; a request meets 503 with the reason while
verification fails. Quota exhausted is 429 (insufficient_quota).

Anyone who can reach --listen spends the deployment's quota: it is loopback by
default; listening elsewhere is said at start.

endpoints:
  POST /v1/chat/completions   stream or not; stream_options.include_usage
  GET  /v1/models             the deployment the enclave serves

exit codes:
  0  stopped
  1  cannot listen, or other errors
  2  misuse of the command line
  3  verification refused at start (nothing listens)

example:
  custos-proxy --enclave enclave.example:8443 --manifest end-user.toml --listen 127.0.0.1:8000
  OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=unused python my_openai_app.py
"""


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="custos-proxy",
        description="Serve OpenAI's chat completions API locally, in front of one verified Custos enclave.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_arguments(parser, output=False)
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=_listen,
        default=_listen(os.environ.get("CUSTOS_PROXY_LISTEN") or DEFAULT_LISTEN),
        help=f"where to serve HTTP (default: $CUSTOS_PROXY_LISTEN, else {DEFAULT_LISTEN})",
    )
    return parser


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen(128)  # connections wait in the backlog until the server takes them
    except OSError as exc:
        sock.close()
        raise ClientError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _serve(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    enclave = PinnedEnclave(
        lambda: connect(
            args.enclave,
            manifest,
            timeout=args.timeout,
            collateral=_collateral(args.pccs),
            amd_kds=args.amd_kds,
        )
    )
    try:
        connection = enclave.connection()
    except VerificationRefusedError:
        raise
    except ClientError as exc:
        print(f"custos-proxy: not verified yet ({exc}); the first request verifies it", file=sys.stderr)
    else:
        simulated = " (SIMULATED platform: proves nothing)" if connection.simulated else ""
        print(
            f"custos-proxy: enclave {args.enclave} verified{simulated}: deployment {connection.deployment}",
            file=sys.stderr,
        )
    host, port = args.listen
    sock = _bind(host, port)
    if not _is_loopback(host):
        print(f"custos-proxy: listening on {host}, not loopback: anyone who reaches it spends the quota",
              file=sys.stderr)  # fmt: skip
    bound = sock.getsockname()[1]
    print(f"custos-proxy: serving http://{host}:{bound}/v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(
        BrowserGuard(Proxy(enclave).app(), listen_host=host),
        log_level="debug" if args.verbose else "warning",
        access_log=args.verbose,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        enclave.close()
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parse = parser()
    args = parse.parse_args(argv)
    if not args.enclave:
        parse.error("--enclave is required (or set CUSTOS_ENCLAVE)")
    if args.manifest is None:
        parse.error("--manifest is required (or set CUSTOS_MANIFEST)")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _serve(args)
    except VerificationRefusedError as exc:
        print(f"custos-proxy: verification refused, nothing was sent: {exc}", file=sys.stderr)
        return exc.exit_code
    except ClientError as exc:
        print(f"custos-proxy: {exc}", file=sys.stderr)
        if args.verbose:
            logger.error("%s", exc.diagnostics(), exc_info=exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
