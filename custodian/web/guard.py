"""What every request passes before a page sees it: the session, the CSRF token, the headers.

* Nothing but ``BASE/login/SECRET`` answers without a live session (401, a page
  saying how to log in), and nothing outside ``BASE``, the console's secret path,
  answers at all but that page: the session cookie's path is ``BASE/``, so a
  browser sends it to no other server on this host (cookies ignore ports).
* Every POST carries the session's CSRF token as the form field
  ``csrf_token`` (403 without it); forms are URL-encoded and at most
  ``MAX_FORM_BYTES``.
* Every response carries a Content-Security-Policy that allows only this
  origin's scripts, styles and images (no inline script or style), forbids
  framing, and is not cached.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import Response

from custodian.web.sessions import Session, Sessions

COOKIE = "custos_console"
MAX_FORM_BYTES = 4096
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class FormError(Exception):
    """The request's form is missing, too large or malformed."""


async def read_form(request: Request) -> dict[str, str]:
    """A URL-encoded form, one value per field, read within ``MAX_FORM_BYTES``."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise FormError("the form must be sent as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormError(f"the form is over {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False, max_num_fields=32)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormError(f"the form is not readable: {exc}") from None
    return {k: v[-1] for k, v in fields.items()}


Handler = Callable[[Request], Awaitable[Response]]


def guarded(
    sessions: Sessions,
    refuse: Callable[[Request, int, str], Awaitable[Response]],
    base: str,
) -> Callable[[Request, Handler], Awaitable[Response]]:
    """The middleware function: session and CSRF checks, then the security headers."""

    async def dispatch(request: Request, call_next: Handler) -> Response:
        response = await _checked(request, call_next)
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        return response

    async def _checked(request: Request, call_next: Handler) -> Response:
        path = request.url.path
        if not path.startswith(f"{base}/"):
            return await refuse(request, 401, "")
        if path.startswith(f"{base}/login/"):
            return await call_next(request)
        session_id = request.cookies.get(COOKIE, "")
        session = sessions.session(session_id) if session_id else None
        if session is None:
            return await refuse(request, 401, "")
        request.state.session = session
        request.state.session_id = session_id
        if request.method not in ("GET", "HEAD"):
            if request.method != "POST":
                return await refuse(request, 405, f"{request.method} is not used here")
            try:
                form = await read_form(request)
            except FormError as exc:
                return await refuse(request, 400, str(exc))
            if not Sessions.csrf_matches(session, form.get("csrf_token", "")):
                return await refuse(request, 403, "the form's CSRF token is missing or not this session's")
            request.state.form = form
        return await call_next(request)

    return dispatch


def session_of(request: Request) -> Session:
    session: Session = request.state.session
    return session
