"""Annotator tokens: random secrets shown once, stored only as SHA-256 hashes.

A token carries 256 random bits, so a fast hash is enough (no password stretching needed): the
database never holds anything that opens the app.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time

from sqlalchemy import select

from preftune.errors import PreftuneError

from . import sessions
from .models import Annotator

TOKEN_PREFIX = "pt_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")


class AnnotatorError(PreftuneError):
    """A bad annotator name, or one that exists / does not exist."""


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def find_annotator(session, token) -> Annotator | None:
    if not isinstance(token, str) or not token.isascii() or not token.startswith(TOKEN_PREFIX) \
            or len(token) > 200:
        return None
    found = session.scalar(select(Annotator).where(Annotator.token_hash == hash_token(token)))
    return found if found is not None and found.active else None


def add_annotator(session, name: str, is_admin: bool = False) -> tuple[Annotator, str]:
    """Create an annotator (or admin); returns it and its token, which is not stored and cannot be recovered."""
    if not NAME_PATTERN.match(name):
        raise AnnotatorError(f"annotator name {name!r}: use letters, digits and . _ - @ (at most 100 characters)")
    if session.scalar(select(Annotator).where(Annotator.name == name)) is not None:
        raise AnnotatorError(f"annotator {name!r} already exists (use 'token rotate' for a new token)")
    token = new_token()
    annotator = Annotator(name=name, token_hash=hash_token(token), is_admin=is_admin, active=True,
                          created_at=time.time())
    session.add(annotator)
    session.flush()
    return annotator, token


def get_annotator(session, name: str) -> Annotator:
    annotator = session.scalar(select(Annotator).where(Annotator.name == name))
    if annotator is None:
        raise AnnotatorError(f"no annotator named {name!r}")
    return annotator


def rotate_token(session, name: str) -> str:
    """Replace an annotator's token (the old one and its browser sessions stop working at once);
    reactivates a revoked one."""
    annotator = get_annotator(session, name)
    token = new_token()
    annotator.token_hash = hash_token(token)
    annotator.active = True
    sessions.end_all(session, annotator.id)
    return token


def revoke(session, name: str) -> None:
    """Disable an annotator's token and end their browser sessions; their labels are kept."""
    annotator = get_annotator(session, name)
    annotator.active = False
    sessions.end_all(session, annotator.id)


def list_annotators(session) -> list[Annotator]:
    return list(session.scalars(select(Annotator).order_by(Annotator.name)))
