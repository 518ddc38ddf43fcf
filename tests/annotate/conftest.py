"""Fixtures for the annotation server: databases (SQLite and a private PostgreSQL), a server in a
subprocess, Chromium, and small seeded projects."""

from __future__ import annotations

import os
import shutil

import pytest
from annotate_services import CHROMIUM_ARGS, PostgresServer, ServerProcess, unavailable


@pytest.fixture(scope="session")
def postgres():
    server = PostgresServer()
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        server.stop()
        unavailable(f"cannot start PostgreSQL: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'annotations.db'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture()
def db(db_url):
    from preftune.annotate.db import Database

    database = Database(db_url)
    database.upgrade()
    yield database
    database.dispose()


def seed(db, kind: str = "pairwise", items: int = 4, overlap: int = 1, annotators=("alice", "bob"),
         admins=("boss",), candidates: int = 2, project: str = "demo", guidelines: str = "Pick the kinder reply.",
         prompts=None) -> dict[str, str]:
    """A project with ``items`` items and the given annotators (its members); returns their tokens by name."""
    from preftune.annotate.importer import ItemSpec, add_items, ensure_project
    from preftune.annotate.members import add_member
    from preftune.annotate.tokens import add_annotator

    tokens = {}
    with db.write() as session:
        proj, _ = ensure_project(session, project, kind, guidelines, overlap)
        specs = [ItemSpec(f"item-{i}", prompts[i] if prompts else f"Prompt {i}",
                          [f"response {i}.{c}" for c in range(candidates)]) for i in range(items)]
        add_items(session, proj, specs, seed=0)
        for name in annotators:
            tokens[name] = add_annotator(session, name)[1]
            add_member(session, project, name)
        for name in admins:
            tokens[name] = add_annotator(session, name, is_admin=True)[1]
    return tokens


@pytest.fixture()
def make_project():
    """``make_project(db, kind=..., items=..., overlap=..., annotators=...) -> tokens by name``."""
    return seed


@pytest.fixture()
def start_server(tmp_path):
    started = []

    def start(db_url: str, *extra: str) -> ServerProcess:
        server = ServerProcess(db_url, tmp_path / f"server-{len(started)}.log", *extra)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def chromium():
    path = os.environ.get("PREFTUNE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        unavailable(f"Chromium is not installed (no {path}; Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright Python package is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
