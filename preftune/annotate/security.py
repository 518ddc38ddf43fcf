"""Who is asking, and may they: token authentication, CSRF checks, request size limits, safe headers.

A token arrives either as ``Authorization: Bearer <token>`` (scripts; no CSRF check needed, browsers
never add that header by themselves) or in the HttpOnly, SameSite=Strict session cookie set at login
(browsers; every state-changing request must then carry the session's CSRF token, and a foreign
``Origin`` is refused). Tokens never appear in URLs, so access logs never see them.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from starlette.exceptions import HTTPException

from .tokens import csrf_matches, csrf_token, find_annotator

SESSION_COOKIE = "preftune_session"
LOGIN_COOKIE = "preftune_login"
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class LoginRequired(Exception):
    """No token, or one that is unknown or revoked."""


class Forbidden(Exception):
    """Authenticated, but not allowed (an annotator on an admin route, a failed CSRF check)."""


@dataclass
class User:
    id: int
    name: str
    is_admin: bool
    token: str
    by_cookie: bool

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)


def request_token(request: Request) -> tuple[str | None, bool]:
    """(token, came from the session cookie)."""
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip(), False
    return request.cookies.get(SESSION_COOKIE), True


def current_user(request: Request) -> User:
    """FastAPI dependency: the annotator the request's token belongs to."""
    token, by_cookie = request_token(request)
    if not token:
        raise LoginRequired()
    with request.app.state.db.read() as session:
        annotator = find_annotator(session, token)
    if annotator is None:
        raise LoginRequired()
    return User(annotator.id, annotator.name, annotator.is_admin, token, by_cookie)


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
    return urlsplit(origin).netloc == request.headers.get("host", "")


def check_csrf(request: Request, user: User, submitted: str | None) -> None:
    """Cookie-authenticated writes need the session's CSRF token and no foreign Origin."""
    if not user.by_cookie:
        return
    if not same_origin(request) or not csrf_matches(user.token, submitted):
        raise Forbidden("the form is out of date or came from another site; reload the page and try again")


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
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
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
