"""Database URLs, engines and schema upgrades (Alembic).

A plain path means an SQLite file (WAL journal, full sync: a label the server acknowledged survives a
crash), created readable by its owner only (0600; SQLite gives its journal files the same mode), as are
the backups taken before an upgrade. ``postgresql://`` URLs use psycopg 3. ``Database.write()``
sessions take SQLite's write lock at once (``BEGIN IMMEDIATE``) so concurrent writers queue instead of
failing; PostgreSQL needs nothing.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import sessionmaker

from preftune.errors import PreftuneError

DEFAULT_DB = "annotations.db"
MIGRATIONS = "preftune.annotate:migrations"


class DatabaseError(PreftuneError):
    """The database cannot be opened or upgraded."""


def normalise_url(db: str | None) -> str:
    """A path becomes ``sqlite:///abs/path``; ``postgres(ql)://`` gets the psycopg 3 driver."""
    db = db or os.environ.get("PREFTUNE_ANNOTATE_DB") or DEFAULT_DB
    if "://" not in db:
        return "sqlite:///" + str(Path(db).expanduser().resolve())
    scheme, rest = db.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        return "postgresql+psycopg://" + rest
    return db


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid URL>"


class Database:
    """Engine plus session factories: ``read()`` gives a session, ``write()`` a transaction that commits."""

    def __init__(self, url: str | None = None, pool_size: int = 20):
        self.url = normalise_url(url)
        try:
            parsed = make_url(self.url)
        except ArgumentError:
            raise DatabaseError(f"not a database URL or path: {self.url!r}") from None
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite and parsed.database:
            parent = Path(parsed.database).parent
            if not parent.is_dir():
                raise DatabaseError(f"cannot create the SQLite database: directory {parent} does not exist")
            if parsed.database != ":memory:":
                private_file(Path(parsed.database))
        kwargs = {"pool_size": pool_size, "max_overflow": 10, "pool_timeout": 60}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
        elif parsed.get_backend_name() == "postgresql":  # plan each statement with its values: a generic
            kwargs["connect_args"] = {"prepare_threshold": None}  # plan misjudges the queue query badly
        try:
            self.engine = create_engine(self.url, **kwargs)
        except Exception as exc:  # unknown dialect, missing driver
            raise DatabaseError(f"cannot open {safe_url(self.url)}: {exc}") from None
        if self.is_sqlite:
            _configure_sqlite(self.engine)
            durable = self.engine.execution_options(sqlite_begin="IMMEDIATE", sqlite_sync="FULL")
            quick = self.engine.execution_options(sqlite_begin="IMMEDIATE", sqlite_sync="NORMAL")
        else:
            durable = quick = self.engine
        # SQLite has one writer at a time; its busy handler polls with sleeps, so threads of this process
        # queue on a lock instead (BEGIN IMMEDIATE still waits for writers in other processes).
        self._write_lock = threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(durable, expire_on_commit=False)
        self._write_quick = sessionmaker(quick, expire_on_commit=False)

    @contextlib.contextmanager
    def read(self):
        with self._read() as session:
            yield session

    @contextlib.contextmanager
    def write(self, durable: bool = True):
        """A write transaction. ``durable=False`` (SQLite): skip the fsync at commit; the write survives
        a crash of this process, and a power cut once any later durable commit has synced the journal."""
        factory = self._write if durable else self._write_quick
        with self._write_lock, factory() as session, session.begin():
            yield session

    def upgrade(self) -> str | None:
        """Bring the schema to the newest revision; returns the revision it started from (None: new)."""
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        try:
            with self.engine.connect() as connection:
                current = MigrationContext.configure(connection).get_current_revision()
                has_tables = bool(inspect(connection).get_table_names())
        except OperationalError as exc:
            raise DatabaseError(f"cannot connect to {safe_url(self.url)}: {exc.orig}") from None
        if has_tables and current is None:
            raise DatabaseError(f"{safe_url(self.url)} holds tables that are not a preftune annotation database")
        head = self.head_revision()
        if current == head:
            return current
        if current is not None and self.is_sqlite:
            backup_sqlite(self.engine.url.database, current)
        with self.engine.connect() as connection:
            if self.is_sqlite:  # table rebuilds must not trip foreign keys (Alembic's batch-mode advice)
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
            try:
                with connection.begin():
                    command.upgrade(alembic_config(connection), "head")
            finally:
                if self.is_sqlite:
                    connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")
        return current

    def head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(connection=None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def backup_sqlite(path: str, revision: str) -> Path:
    """Copy the database aside (``<file>.before-<revision>``) before a schema upgrade touches it."""
    target = private_file(Path(f"{path}.before-{revision}"))
    source = sqlite3.connect(path)
    try:
        with contextlib.closing(sqlite3.connect(target)) as copy:
            source.backup(copy)
    finally:
        source.close()
    return target


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 if it does not exist; an existing file (and its SQLite journal
    files) readable by others is made 0600 (one created by an older preftune, or by hand)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        for found in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            try:
                if found.stat().st_mode & 0o077 and found.stat().st_uid == os.getuid():
                    os.chmod(found, 0o600)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise DatabaseError(f"cannot make {found} private: {exc.strerror}") from None
    except OSError as exc:
        raise DatabaseError(f"cannot create {path}: {exc.strerror}") from None
    return path


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        options = connection.get_execution_options()
        driver = connection.connection.driver_connection
        driver.execute(f"PRAGMA synchronous={options.get('sqlite_sync', 'FULL')}")
        driver.execute(f"BEGIN {options.get('sqlite_begin', 'DEFERRED')}")
