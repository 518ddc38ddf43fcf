"""Services the annotation tests start: a private PostgreSQL cluster and the server in a subprocess.

PostgreSQL and Chromium come from Debian's packages (scripts/test-setup.sh installs them). Where they
are missing the tests that need them skip and say why; with CI=true they fail instead.
Set PREFTUNE_PG_BIN (a directory with initdb) or PREFTUNE_CHROMIUM (a binary) to use other installs.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[2]


def unavailable(reason: str):
    """Skip a test whose service is missing, except under CI=true where it must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true requires this test to run (scripts/test-setup.sh installs it)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """A throw-away PostgreSQL cluster in a temporary directory, on a free loopback port."""

    def __init__(self):
        pattern = os.environ.get("PREFTUNE_PG_BIN", "/usr/lib/postgresql/*/bin") + "/initdb"
        found = sorted(glob.glob(pattern))
        initdb = found[-1] if found else ("PREFTUNE_PG_BIN" not in os.environ and shutil.which("initdb"))
        if not initdb:
            unavailable(f"PostgreSQL is not installed (no {pattern}; Debian: apt-get install postgresql)")
        self.bin = Path(initdb).parent
        self.prefix: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="preftune-pg-"))
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                unavailable("running as root and there is no 'postgres' user to run PostgreSQL as")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.databases = 0

    def _run(self, *args: str) -> None:
        result = subprocess.run(self.prefix + list(args), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")

    def start(self) -> None:
        data = self.root / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync",
                  "-E", "UTF8", "--locale=C")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=400 -c full_page_writes=off")
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.root / "log"), "-o", options, "-w", "start")

    def stop(self) -> None:
        subprocess.run(self.prefix + [str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate",
                                      "stop"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self) -> str:
        import psycopg

        self.databases += 1
        name = f"annotate_{self.databases}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR",)}
    env.update(NO_COLOR="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


class ServerProcess:
    """``preftune annotate serve`` in a subprocess, its output in a log file."""

    def __init__(self, db_url: str, log_path: Path, *extra: str):
        self.db_url, self.log_path, self.extra = db_url, log_path, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "preftune.cli", "annotate", "serve", "--db", self.db_url, "--port", str(self.port),
             *self.extra], stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=ROOT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/login", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server did not start within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no flushing; only what was committed survives."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
