"""A throwaway PostgreSQL server for the tests: ``initdb`` + ``pg_ctl`` into a temporary folder.

Debian's ``postgresql`` package puts the binaries in ``/usr/lib/postgresql/<version>/bin`` (``.ci/run``
installs it when it is missing). PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` user the package creates (else ``nobody``) through ``runuser``. It listens on 127.0.0.1 at
a free port with ``trust`` authentication, without fsync (a test server: speed over durability), and
is stopped and deleted when the session ends. Each test gets a database of its own
(:meth:`PgServer.new_database`). Nothing here is reached from outside the machine.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "pixquery"


def find_bin_dir() -> Path | None:
    """The newest PostgreSQL server binaries on this machine (None: none installed)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: float(Path(p).parent.name or 0))
    for folder in reversed(candidates):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServerError(RuntimeError):
    """The server could not be started (the tests that need it skip with this message)."""


class PgServer:
    """One PostgreSQL server in a temporary folder; :meth:`stop` removes it."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.run_as: str | None = None
        if os.geteuid() == 0:  # initdb and postgres refuse root
            for name in ("postgres", "nobody"):
                try:
                    pwd.getpwnam(name)
                except KeyError:
                    continue
                self.run_as = name
                break
            if self.run_as is None:
                raise PgServerError("running as root and there is neither a 'postgres' nor a 'nobody' user")
        self.folder = Path(tempfile.mkdtemp(prefix="pixquery-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = _free_port()
        self._names = itertools.count(1)
        self._started = False
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.folder,
                              env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"})

    def start(self) -> "PgServer":
        init = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8",
                         "--locale=C.UTF-8", "--no-sync")
        if init.returncode != 0:
            raise PgServerError(f"initdb failed: {(init.stderr or init.stdout).strip()[-600:]}")
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        started = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options,
                            "start")
        if started.returncode != 0:
            log = self.log.read_text(errors="replace")[-600:] if self.log.exists() else ""
            raise PgServerError(f"pg_ctl start failed: {(started.stderr or started.stdout).strip()[-400:]} {log}")
        self._started = True
        deadline = time.monotonic() + 30
        while True:  # pg_ctl -w waited for it; make sure it takes a TCP connection
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise PgServerError(f"the server does not accept connections on port {self.port}") from None
                time.sleep(0.1)
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # a name made here of letters and digits only
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by :meth:`new_database`, closing whatever still uses it."""
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self._started:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
            self._started = False
        shutil.rmtree(self.folder, ignore_errors=True)


def start_server() -> PgServer:
    """A running server, or :class:`PgServerError` saying why there cannot be one here."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise PgServerError("psycopg is not installed (pip install 'pixquery[postgres]')") from None
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PgServerError("no PostgreSQL server binaries (apt-get install postgresql)")
    server = PgServer(bin_dir)
    try:
        return server.start()
    except (PgServerError, OSError, subprocess.SubprocessError) as exc:
        server.stop()
        raise PgServerError(str(exc)) from None
