"""Browser sessions: a random id in the cookie (never the annotator's token), stored only as a hash.

``start`` creates one at login (a fresh id every time: the id a browser had before logging in is
never reused); ``end`` deletes it at logout; revoking or rotating an annotator's token ends all
their sessions (``end_all``). A session lasts ``SESSION_SECONDS`` from login, then the browser has to
log in again. The CSRF token of a form is derived from the session id, so it dies with the session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from sqlalchemy import delete, select

from .models import Annotator, LoginSession

SESSION_PREFIX = "ps_"
SESSION_SECONDS = 7 * 24 * 3600


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secrets_match(expected: str, given) -> bool:
    """Constant-time comparison that accepts anything: non-text (an upload) and non-ASCII text never
    match instead of raising (``hmac.compare_digest`` refuses non-ASCII ``str``)."""
    if not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8", "surrogatepass"))


def csrf_token(secret: str) -> str:
    """The form token for a session (or token): unguessable without the session's own secret."""
    return hmac.new(secret.encode("utf-8"), b"preftune-annotate-csrf", hashlib.sha256).hexdigest()


def csrf_matches(secret: str, value) -> bool:
    return secrets_match(csrf_token(secret), value)


def start(session, annotator_id: int, seconds: float = SESSION_SECONDS) -> str:
    """A new session for the annotator; returns its id (for the cookie; only the hash is stored)."""
    now = time.time()
    session.execute(delete(LoginSession).where(LoginSession.expires_at <= now))
    session_id = SESSION_PREFIX + secrets.token_urlsafe(32)
    session.add(LoginSession(id_hash=hash_secret(session_id), annotator_id=annotator_id, created_at=now,
                             expires_at=now + seconds))
    session.flush()
    return session_id


def find(session, session_id) -> Annotator | None:
    """The active annotator of an unexpired session, else None."""
    if not isinstance(session_id, str) or not session_id.isascii() or not session_id.startswith(SESSION_PREFIX) \
            or len(session_id) > 100:
        return None
    found = session.scalar(select(Annotator).join(LoginSession, LoginSession.annotator_id == Annotator.id).where(
        LoginSession.id_hash == hash_secret(session_id), LoginSession.expires_at > time.time()))
    return found if found is not None and found.active else None


def end(session, session_id) -> None:
    if isinstance(session_id, str) and session_id:
        session.execute(delete(LoginSession).where(LoginSession.id_hash == hash_secret(session_id)))


def end_all(session, annotator_id: int) -> None:
    session.execute(delete(LoginSession).where(LoginSession.annotator_id == annotator_id))
