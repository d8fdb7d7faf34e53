"""One-time login links and the browser sessions they open.

A login link carries 256 random bits, is valid for ``LOGIN_LINK_SECONDS`` and
opens at most one session. A session is a random id in a cookie (HttpOnly,
SameSite=Strict, Secure where the console serves TLS), expiring after
``SESSION_IDLE_SECONDS`` without a request and ``SESSION_MAX_SECONDS`` after
login at the latest; it holds its own CSRF token, which every form carries.
Only digests of links and session ids are kept, so a memory dump of this table
opens nothing. Everything is in memory: a restarted custodian logs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

LOGIN_LINK_SECONDS = 300
SESSION_IDLE_SECONDS = 30 * 60
SESSION_MAX_SECONDS = 12 * 3600
# Bounds on what an unauthenticated caller can make us hold (links are minted over the 0600 socket).
MAX_PENDING_LINKS = 64
MAX_SESSIONS = 256


@dataclass(frozen=True)
class Session:
    # Who asked for the login link, as the console said of itself (claimed, like the CLI's origin).
    user: str
    # A short, non-secret name of this session for the audit log.
    label: str
    csrf_token: str
    opened_at: datetime
    last_seen: datetime

    def origin(self, where: str) -> str:
        """The audit log's origin of an action taken in this session."""
        return f"web console {where} session {self.label} login {self.user}"


@dataclass(frozen=True)
class _Link:
    user: str
    expires_at: datetime


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Sessions:
    def __init__(self, *, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._now = now
        self._links: dict[str, _Link] = {}
        self._sessions: dict[str, Session] = {}
        self._flashes: dict[str, str] = {}

    def new_login_link(self, user: str) -> str:
        """The secret of a fresh one-time login link for ``user`` (the URL's last path segment)."""
        self._forget_expired()
        if len(self._links) >= MAX_PENDING_LINKS:
            oldest = min(self._links, key=lambda k: self._links[k].expires_at)
            del self._links[oldest]
        secret = secrets.token_urlsafe(32)
        self._links[_digest(secret)] = _Link(user, self._now() + timedelta(seconds=LOGIN_LINK_SECONDS))
        return secret

    def log_in(self, link_secret: str) -> tuple[str, Session] | None:
        """Spend a login link: a new session id and its session, or None for an unknown, used or
        expired link."""
        self._forget_expired()
        link = self._links.pop(_digest(link_secret), None)
        if link is None:
            return None
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].last_seen)
            del self._sessions[oldest]
        session_id = secrets.token_urlsafe(32)
        now = self._now()
        session = Session(
            user=link.user,
            label=_digest(session_id)[:12],
            csrf_token=secrets.token_urlsafe(32),
            opened_at=now,
            last_seen=now,
        )
        self._sessions[_digest(session_id)] = session
        return session_id, session

    def session(self, session_id: str) -> Session | None:
        """The live session with this id (its idle timer restarted), or None."""
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._now()
        if self._expired(session, now):
            del self._sessions[key]
            self._flashes.pop(key, None)
            return None
        session = self._sessions[key] = replace(session, last_seen=now)
        return session

    def log_out(self, session_id: str) -> None:
        self._sessions.pop(_digest(session_id), None)
        self._flashes.pop(_digest(session_id), None)

    def flash(self, session_id: str, text: str) -> None:
        """A line the session's next page shows once (what the last action did)."""
        self._flashes[_digest(session_id)] = text

    def pop_flash(self, session_id: str) -> str:
        return self._flashes.pop(_digest(session_id), "")

    @staticmethod
    def csrf_matches(session: Session, token: str) -> bool:
        return hmac.compare_digest(session.csrf_token.encode(), token.encode())

    def _expired(self, session: Session, now: datetime) -> bool:
        return now - session.last_seen > timedelta(
            seconds=SESSION_IDLE_SECONDS
        ) or now - session.opened_at > timedelta(seconds=SESSION_MAX_SECONDS)

    def _forget_expired(self) -> None:
        now = self._now()
        for key in [k for k, link in self._links.items() if link.expires_at <= now]:
            del self._links[key]
        for key in [k for k, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[key]
            self._flashes.pop(key, None)
