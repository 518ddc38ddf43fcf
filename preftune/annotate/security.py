"""Who is asking, and may they: tokens and sessions, CSRF checks, login rate limits, size limits, headers.

A script sends its token as ``Authorization: Bearer <token>`` (no CSRF check needed: browsers never add
that header by themselves). A browser logs in once with its token and then carries a random session id
in an HttpOnly, SameSite=Strict cookie (``__Host-`` prefixed over HTTPS, so no other site or port of
the host can set it); every state-changing request must then carry the session's CSRF token, and a
foreign ``Origin`` is refused. Tokens never appear in URLs or cookies, so logs and other services on
the host never see them.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Path, Request
from starlette.exceptions import HTTPException

from . import sessions
from .tokens import find_annotator

MAX_ID = 2**31 - 1  # ids are 32-bit integer columns; a larger one cannot exist
RowId = Annotated[int, Path(ge=1, le=MAX_ID)]
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def cookie_name(request: Request, name: str) -> str:
    """``__Host-`` names over HTTPS: the browser then insists on Secure, Path=/ and no Domain."""
    return f"__Host-{name}" if request.app.state.settings.secure_cookies else name


def session_cookie(request: Request) -> str:
    return cookie_name(request, "preftune_session")


def login_cookie(request: Request) -> str:
    return cookie_name(request, "preftune_login")


class LoginRequired(Exception):
    """No token or session, or one that is unknown, expired or revoked."""


class Forbidden(Exception):
    """Authenticated, but not allowed (an annotator on an admin route, a failed CSRF check)."""


class TooManyAttempts(Exception):
    """Too many failed logins from one address."""

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed logins from your address; try again in {retry_after} seconds")
        self.retry_after = retry_after


@dataclass
class User:
    id: int
    name: str
    is_admin: bool
    secret: str  # the bearer token, or the session id for a browser
    by_cookie: bool

    @property
    def csrf(self) -> str:
        return sessions.csrf_token(self.secret)


def request_secret(request: Request) -> tuple[str | None, bool]:
    """(bearer token or session id, came from the session cookie)."""
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip(), False
    return request.cookies.get(session_cookie(request)), True


def current_user(request: Request) -> User:
    """FastAPI dependency: the annotator the request's token or session belongs to."""
    secret, by_cookie = request_secret(request)
    if not secret:
        raise LoginRequired()
    with request.app.state.db.read() as session:
        annotator = sessions.find(session, secret) if by_cookie else find_annotator(session, secret)
    if annotator is None:
        raise LoginRequired()
    return User(annotator.id, annotator.name, annotator.is_admin, secret, by_cookie)


def admin_user(request: Request) -> User:
    """FastAPI dependency: an admin, or 403."""
    user = current_user(request)
    if not user.is_admin:
        raise Forbidden("this page is for admins")
    return user


def same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True
    try:
        return urlsplit(origin).netloc == request.headers.get("host", "")
    except ValueError:  # not a URL at all
        return False


def check_csrf(request: Request, user: User, submitted) -> None:
    """Cookie-authenticated writes need the session's CSRF token and no foreign Origin."""
    if not user.by_cookie:
        return
    if not same_origin(request) or not sessions.csrf_matches(user.secret, submitted):
        raise Forbidden("the form is out of date or came from another site; reload the page and try again")


class LoginLimiter:
    """At most ``attempts`` failed logins per client address within ``window`` seconds (in memory).

    O(1) per request however many addresses failed: each address keeps at most ``attempts`` failure
    times, addresses are kept in order of their latest failure, and stale ones are dropped from the old
    end as new failures come (at most ``max_addresses`` are kept; beyond that the stalest go first).
    The limit only ever refuses *failed* logins: the login route checks the token first, so a valid
    token logs in even from an address that is over the limit (nobody can lock another person out by
    failing from their address, or from a proxy's). The address is the connection's peer, or the
    client a trusted proxy names (``preftune annotate serve --trusted_proxies``; never by default).
    """

    def __init__(self, attempts: int = 10, window: float = 300.0, max_addresses: int = 100_000):
        self.attempts, self.window, self.max_addresses = attempts, window, max_addresses
        self.failures: OrderedDict[str, deque] = OrderedDict()

    def check(self, address: str) -> None:
        recent = self.failures.get(address)
        now = time.monotonic()
        if recent is not None and len(recent) >= self.attempts and recent[0] > now - self.window:
            raise TooManyAttempts(int(recent[0] + self.window - now) + 1)

    def failed(self, address: str) -> None:
        now = time.monotonic()
        recent = self.failures.get(address)
        if recent is None:
            recent = self.failures[address] = deque(maxlen=self.attempts)
        else:
            self.failures.move_to_end(address)
        recent.append(now)
        for _ in range(2):  # amortised: each failure removes up to two stale addresses from the old end
            oldest = next(iter(self.failures.values()))
            if oldest[-1] > now - self.window and len(self.failures) <= self.max_addresses:
                break
            self.failures.popitem(last=False)


def client_address(request: Request) -> str:
    """The connection's peer; behind ``--trusted_proxies``, uvicorn has already put the forwarded client here."""
    return request.client.host if request.client else "unknown"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body too large (limit {limit} bytes)")


class GuardMiddleware:
    """Pure ASGI middleware: refuse bodies over ``max_body`` bytes (413) and add security headers."""

    def __init__(self, app, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        async def guarded_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": with_security_headers(message.get("headers", []))}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = f"request body too large (limit {self.max_body} bytes)".encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())] + SECURITY_HEADERS})
        await send({"type": "http.response.body", "body": body})


def with_security_headers(headers) -> list:
    present = {name.lower() for name, _ in headers}
    return list(headers) + [(name, value) for name, value in SECURITY_HEADERS if name not in present]
