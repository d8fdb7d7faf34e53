"""HTTP GET for collateral services: timeouts, retries with backoff, a byte limit, errors naming the URL."""

from __future__ import annotations

import argparse
import http.client
import logging
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from enclave.errors import EnclaveError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_ATTEMPTS = 3
DEFAULT_MAX_BYTES = 1024 * 1024
_RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_BACKOFF_CAP_SECONDS = 8.0


class CollateralServiceError(EnclaveError):
    """A collateral service could not be reached or gave no usable answer.

    ``status`` is the HTTP status when the service answered (404 for a
    document it does not have), else None.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


@dataclass(frozen=True)
class Response:
    body: bytes
    # Header names lower-cased; values as sent.
    headers: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def join(base: str, path: str, query: Mapping[str, str] | None = None) -> str:
    """``base`` (scheme://host[:port][/prefix]) + ``path``, with ``query`` URL-encoded."""
    url = base.rstrip("/") + "/" + path.lstrip("/")
    return f"{url}?{urllib.parse.urlencode(query)}" if query else url


def check_base_url(base: str) -> str:
    """The base URL of a service as a flag gives it; only http(s) URLs with a host."""
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise ValueError(f"not an http(s) URL with a host: {base[:200]!r}")
    if parsed.query or parsed.fragment:
        raise ValueError(f"a service base URL takes no query or fragment: {base[:200]!r}")
    return base.rstrip("/")


def service_url_argument(text: str) -> str | None:
    """The value of a service flag (``--pccs``, ``--amd-kds``): a base URL, or ``off`` (None: none)."""
    if text == "off":
        return None
    try:
        return check_base_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def get(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    attempts: int = DEFAULT_ATTEMPTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    sleep: Callable[[float], None] = time.sleep,
) -> Response:
    """GET ``url``; retry connection failures and 408/429/5xx with jittered exponential backoff.

    Any other status is final (a 404 is the service's answer, not a failure to
    reach it). A body larger than ``max_bytes`` is refused without being read
    whole. Raises :class:`CollateralServiceError` naming the URL.
    """
    last: CollateralServiceError | None = None
    for attempt in range(max(1, attempts)):
        if attempt:
            delay = min(_BACKOFF_CAP_SECONDS, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)  # noqa: S311
            logger.info("retrying %s in %.1f s (%s)", url, delay, last)
            sleep(delay)
        try:
            return _get_once(url, timeout=timeout, max_bytes=max_bytes)
        except CollateralServiceError as exc:
            if exc.status is not None and exc.status not in _RETRIED_STATUSES:
                raise
            last = exc
    assert last is not None
    raise last


def _get_once(url: str, *, timeout: float, max_bytes: int) -> Response:
    request = urllib.request.Request(url, headers={"Accept": "*/*", "User-Agent": "custos"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 (scheme checked by callers)
            body = reply.read(max_bytes + 1)
            if len(body) > max_bytes:
                raise CollateralServiceError(
                    f"{url}: the answer exceeds {max_bytes} bytes", url=url, status=reply.status
                )
            headers = {name.lower(): value for name, value in reply.headers.items()}
            return Response(body=body, headers=headers)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the connection
        raise CollateralServiceError(
            f"{url}: HTTP {exc.code} {exc.reason}", url=url, status=exc.code
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise CollateralServiceError(f"{url}: not reachable ({reason})", url=url) from None
