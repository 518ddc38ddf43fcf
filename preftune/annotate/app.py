"""The web app: ``create_app(db, settings)`` wires pages, API, admin routes, errors and guards together.

Only ``/login`` and ``/static/*`` answer without a token. Pages redirect a visitor without a valid
token to the login form; the API and the admin downloads answer 401.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from starlette.exceptions import HTTPException

from . import admin, api, pages
from .answers import AnswerError
from .db import Database
from .queue import LEASE_SECONDS, NotAssigned, RequestConflict
from .reports import ProjectReports
from .security import SECURITY_HEADERS, Forbidden, GuardMiddleware, LoginLimiter, LoginRequired, TooManyAttempts

HERE = Path(__file__).resolve().parent
DEFAULT_MAX_BODY = 1_000_000


@dataclass
class ServerSettings:
    max_body: int = DEFAULT_MAX_BODY
    lease: float = LEASE_SECONDS
    secure_cookies: bool = False
    threads: int = 8  # worker threads for annotators' database calls
    admin_threads: int = 1  # admin reports and exports run on their own, so they never hold up annotators
    report_seconds: float = 2.0  # an admin report is reused this long without checking for new labels
    login_attempts: int = 10  # failed logins allowed per client address ...
    login_window: float = 300.0  # ... within this many seconds


def _wants_json(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/api/") or path.endswith((".json", ".jsonl"))


def _error(request: Request, status: int, message: str, heading: str = "Something went wrong", headers=None):
    if _wants_json(request):
        return JSONResponse({"detail": message}, status, headers=headers)
    context = {"title": heading, "heading": heading, "message": message, "user": None}
    response = pages.render(request, "error.html", context, status)
    response.headers.update(headers or {})
    return response


# errors answered with a fixed status and heading; the message is the exception's own text unless given here
PLAIN_ERRORS = ((Forbidden, 403, "Not allowed", None),
                (NotAssigned, 404, "Not found", "That item is not in your queue."),
                (RequestConflict, 409, "Conflict", None),
                (AnswerError, 422, "Invalid answer", None))


def _plain_handler(status: int, heading: str, message: str | None):
    async def handler(request: Request, exc: Exception):
        return _error(request, status, message or str(exc), heading)

    return handler


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired):
        if _wants_json(request):
            return JSONResponse({"detail": "a valid token is required"}, 401, headers={"www-authenticate": "Bearer"})
        if request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        return _error(request, 401, "Please log in again.", "Not logged in")

    for error, status, heading, message in PLAIN_ERRORS:
        app.add_exception_handler(error, _plain_handler(status, heading, message))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # never echo the input back (it could hold a token); name the fields only
        fields = sorted({".".join(str(part) for part in error.get("loc", ())) for error in exc.errors()})
        return _error(request, 422, f"invalid request: {', '.join(fields)}", "Invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(request, exc.status_code, str(exc.detail), "Error", headers=exc.headers)

    @app.exception_handler(TooManyAttempts)
    async def too_many(request: Request, exc: TooManyAttempts):
        return _error(request, 429, str(exc), "Too many attempts", headers={"retry-after": str(exc.retry_after)})

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        # answered outside the middleware stack, so the security headers are added here; the server logs
        # the traceback (a bug), the client sees no details
        headers = {name.decode(): value.decode() for name, value in SECURITY_HEADERS}
        return PlainTextResponse("internal server error", 500, headers=headers)


def create_app(db: Database, settings: ServerSettings | None = None, watcher=None) -> FastAPI:
    """The ASGI app over an upgraded database; ``watcher`` (a RewardModelWatcher) runs while it serves."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        anyio.to_thread.current_default_thread_limiter().total_tokens = app.state.settings.threads
        if watcher is not None:
            watcher.start()
        try:
            yield
        finally:
            if watcher is not None:
                watcher.stop()

    app = FastAPI(title="preftune annotate", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.db = db
    app.state.settings = settings or ServerSettings()
    app.state.admin_limiter = CapacityLimiter(app.state.settings.admin_threads)
    app.state.reports = ProjectReports()
    app.state.login_limiter = LoginLimiter(app.state.settings.login_attempts, app.state.settings.login_window)
    environment = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True,
                              lstrip_blocks=True)
    app.state.templates = Jinja2Templates(env=environment)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(admin.router)
    _install_error_handlers(app)
    app.add_middleware(GuardMiddleware, max_body=app.state.settings.max_body)
    return app
