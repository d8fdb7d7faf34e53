"""The console's Starlette application: its routes, its templates and how errors are shown.

Pages are server-rendered (Jinja2, autoescaped) and each has a JSON twin
(``?format=json``), and its ``live`` part alone (``?format=live``) for the
refresh script. Errors never show a traceback: a domain error is its one line,
with the status the admin API would give it.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from custodian.errors import (
    ConflictError,
    CustodianError,
    InvalidRequestError,
    NotFoundError,
    RefusedError,
    SuspendedError,
)
from custodian.web import actions
from custodian.web.chart import bar_chart
from custodian.web.guard import COOKIE, guarded, session_of
from custodian.web.sessions import SESSION_MAX_SECONDS, Sessions
from custodian.web.views import ConsoleServices, Views

_HERE = Path(__file__).parent
_STATUS = {
    InvalidRequestError: 400,
    NotFoundError: 404,
    ConflictError: 409,
    RefusedError: 403,
    SuspendedError: 409,
}


def templates(base: str) -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["units"] = unit_word
    env.globals["base"] = base
    return Jinja2Templates(env=env)


def unit_word(unit: str) -> str:
    """What a deployment's quota counts, in the plural: a language model's tokens, a classifier's calls."""
    return "tokens" if unit == "token" else "inferences"


class ConsoleApp:
    """Routes and their handlers; ``origin`` names the console's address in audit entries.

    Every page is under ``base``, a path of 128 random bits that only login URLs reveal, and so
    is the session cookie: browsers send a cookie to every port of its host, and a path no
    other server on the host can guess is what keeps it from them (``custodian.web.guard``).
    """

    def __init__(
        self, services: ConsoleServices, sessions: Sessions, *, origin: str, base: str, secure: bool
    ) -> None:
        self.services = services
        self.sessions = sessions
        self.views = Views(services)
        self.origin = origin
        self.base = base
        self.secure = secure
        self.templates = templates(base)

    def render(self, request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        session = getattr(request.state, "session", None)
        flash = self.sessions.pop_flash(request.state.session_id) if session else ""
        full = {"session": session, "flash": flash, "page": name.removesuffix(".html"), **context}
        return self.templates.TemplateResponse(request, name, full, status_code=status)

    async def page(
        self, request: Request, name: str, read: Callable[[], Awaitable[dict[str, Any]]]
    ) -> Response:
        """A page, or its JSON twin with ``?format=json``."""
        data = await read()
        if request.query_params.get("format") == "json":
            return JSONResponse(data)
        if request.query_params.get("format") == "live":
            return JSONResponse({"live": data["live"]})
        return self.render(request, name, data)

    async def refuse(self, request: Request, status: int, reason: str) -> Response:
        if status == 401:
            reason = "Log in with the one-time URL that `custodian console login` prints."
        if request.query_params.get("format") == "json":
            return JSONResponse({"error": reason}, status_code=status)
        context = {"status": status, "reason": reason, "session": None, "flash": "", "page": "error"}
        return self.templates.TemplateResponse(request, "error.html", context, status_code=status)

    # ---------------------------------------------------------------- routes

    async def login(self, request: Request) -> Response:
        opened = self.sessions.log_in(request.path_params["secret"])
        if opened is None:
            return await self.refuse(
                request, 403, "This login URL is not valid: it was used already, or it expired (5 minutes)."
            )
        session_id, _ = opened
        response = RedirectResponse(f"{self.base}/", status_code=303)
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=SESSION_MAX_SECONDS,
            path=f"{self.base}/",
            secure=self.secure,
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request) -> Response:
        self.sessions.log_out(request.state.session_id)
        response = await self.refuse(request, 200, "Logged out.")
        response.delete_cookie(
            COOKIE, path=f"{self.base}/", secure=self.secure, httponly=True, samesite="strict"
        )
        return response

    async def overview(self, request: Request) -> Response:
        return await self.page(request, "overview.html", self.views.overview)

    async def deployment(self, request: Request) -> Response:
        name = request.path_params["name"]
        wanted = request.query_params.get("format")
        if wanted == "live":  # what the refresh script reads twice a second: no history
            data = await self.views.deployment(name, "hour", with_history=False)
            return JSONResponse({"live": data["live"]})
        data = await self.views.deployment(name, request.query_params.get("span", "hour"))
        if wanted == "json":
            return JSONResponse(data)
        history = data["history"]
        buckets: list[str] = history["buckets"]
        labels = [b[11:16] if history["span"] == "hour" else b[5:10] for b in buckets]
        series = {"granted": history["granted"], "used": history["used"]}
        return self.render(request, "deployment.html", {**data, "chart": bar_chart(buckets, series, labels)})

    async def enclave(self, request: Request) -> Response:
        instance = request.path_params["instance"]
        return await self.page(request, "enclave.html", lambda: self.views.enclave(instance))

    async def evidence(self, request: Request) -> Response:
        instance = request.path_params["instance"]
        recorded = self.services.evidence.get(instance)
        if recorded is None:
            raise NotFoundError(f"no evidence kept for instance {instance!r} (see the enclave page)")
        return Response(
            recorded.evidence,
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="evidence-{instance[:32]}.json"'},
        )

    async def models(self, request: Request) -> Response:
        return await self.page(request, "models.html", self.views.models)

    async def audit(self, request: Request) -> Response:
        q = request.query_params
        before = q.get("before", "0")
        if not before.isdigit() or len(before) > 18:
            raise InvalidRequestError("before must be an entry number")
        subject, action = q.get("subject", "")[:200], q.get("action", "")[:200]
        return await self.page(
            request,
            "audit.html",
            lambda: self.views.audit(subject=subject, action=action, before=int(before)),
        )

    async def action(self, request: Request) -> Response:
        return await actions.run(self, request, session_of(request))

    async def audit_export(self, request: Request) -> Response:
        return await actions.export_audit(self, request)

    async def domain_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CustodianError)
        return await self.refuse(request, _STATUS.get(type(exc), 400), exc.diagnostics())

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return await self.refuse(request, exc.status_code, str(exc.detail))


def new_base() -> str:
    """A fresh secret path for a console's pages: ``/c/`` and 128 random bits."""
    return f"/c/{secrets.token_urlsafe(16)}"


def build(
    services: ConsoleServices, sessions: Sessions, *, origin: str, base: str, secure: bool = False
) -> Starlette:
    console = ConsoleApp(services, sessions, origin=origin, base=base, secure=secure)
    routes = [
        Route(f"{base}/login/{{secret}}", console.login, methods=["GET"]),
        Route(f"{base}/logout", console.logout, methods=["POST"]),
        Route(f"{base}/", console.overview, methods=["GET"]),
        Route(f"{base}/deployments/{{name}}", console.deployment, methods=["GET"]),
        Route(f"{base}/deployments/{{name}}/{{action}}", console.action, methods=["POST"]),
        Route(f"{base}/enclaves/{{instance}}", console.enclave, methods=["GET"]),
        Route(f"{base}/enclaves/{{instance}}/evidence", console.evidence, methods=["GET"]),
        Route(f"{base}/models", console.models, methods=["GET"]),
        Route(f"{base}/audit", console.audit, methods=["GET"]),
        Route(f"{base}/audit/export", console.audit_export, methods=["GET"]),
        Mount(f"{base}/static", app=StaticFiles(directory=_HERE / "static"), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=guarded(sessions, console.refuse, base))],
        exception_handlers={CustodianError: console.domain_error, HTTPException: console.http_error},
    )
