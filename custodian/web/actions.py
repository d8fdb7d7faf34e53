"""The deployment actions (grant, revoke, suspend, resume, rotate token) and the audit export.

Each action takes two POSTs: the first checks the input and shows what will
happen with a confirm button, the second (``confirm=yes``) does it, through
``custodian.deployments`` as the admin API does, audited with the session as
its origin. Bad input is refused before anything changes.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response

from custodian.audit_stream import LedgerAudit, export
from custodian.config import MAX_GRANT_UNITS
from custodian.errors import InvalidRequestError, NotFoundError
from custodian.web.sessions import Session

if TYPE_CHECKING:
    from custodian.web.app import ConsoleApp

_QUESTIONS = {
    "grant": "Add {units} {unit} to the balance of {name}?",
    "revoke": "Take back {units} {unit} from {name} (the free balance first, then its enclaves' leases)?",
    "suspend": "Suspend {name}? Its enclaves stop serving at once.",
    "resume": "Let {name} serve again?",
    "rotate-token": "Give {name} a new join token? The current one stops admitting enclaves.",
}


def _units(form: dict[str, str], action: str) -> tuple[int, bool]:
    """The units a grant or revoke names (or revoke's ``all``), checked before anything runs."""
    if action == "revoke" and form.get("all") == "yes":
        return 0, True
    text = form.get("units", "").strip()
    if not text.isdigit() or not 1 <= int(text[:15]) <= MAX_GRANT_UNITS:
        raise InvalidRequestError(
            f"units must be a whole number from 1 to {MAX_GRANT_UNITS}, got {text[:20]!r}"
        )
    return int(text), False


async def run(app: ConsoleApp, request: Request, session: Session) -> Response:
    name, action = request.path_params["name"], request.path_params["action"]
    if action not in _QUESTIONS:
        raise NotFoundError(f"no action {action!r}")
    form: dict[str, str] = request.state.form
    units, everything = _units(form, action) if action in ("grant", "revoke") else (0, False)
    deployments = app.services.deployments
    # An unknown deployment is refused before any confirmation.
    (before,) = await deployments.usage(name)
    unit = "tokens" if before.unit == "token" else "units"  # as `custodian grant` says it
    if form.get("confirm") != "yes":
        amount = "all unused" if everything else str(units)
        return app.render(
            request,
            "confirm.html",
            {
                "question": _QUESTIONS[action].format(units=amount, unit=unit, name=name),
                "action": action,
                "name": name,
                "fields": {k: v for k, v in form.items() if k in ("units", "all")},
            },
        )
    origin = session.origin(app.origin)
    session_id: str = request.state.session_id
    if action == "grant":
        usage, changed = await deployments.grant(name, units, origin=origin)
        done = f"granted {changed} {unit}; {name} balance is now {usage.balance}"
    elif action == "revoke":
        usage, changed = await deployments.revoke(name, units=units, everything=everything, origin=origin)
        done = f"revoked {changed} {unit}; {name} balance is now {usage.balance}"
    elif action == "suspend":
        await deployments.suspend(name, origin=origin)
        done = f"deployment {name} suspended"
    elif action == "resume":
        await deployments.resume(name, origin=origin)
        done = f"deployment {name} resumed"
    else:
        token = await deployments.rotate_token(name, origin=origin)
        # Shown once, on this response only (not cached: see guard.SECURITY_HEADERS).
        return app.render(request, "token.html", {"name": name, "token": token})
    app.sessions.flash(session_id, done)
    return RedirectResponse(f"{app.base}/deployments/{name}", status_code=303)


async def export_audit(app: ConsoleApp, request: Request) -> Response:
    """The audit log as ``custodian audit export`` writes it, chain checked first, as a download."""
    folder = Path(tempfile.mkdtemp(prefix="custos-audit-"))
    out = folder / "audit.jsonl"
    try:
        await export(LedgerAudit(app.services.ledger), out, None, now=app.services.ledger.now())
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return FileResponse(
        out,
        media_type="application/x-ndjson",
        filename="custos-audit.jsonl",
        background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True),
    )
