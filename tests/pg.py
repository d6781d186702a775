"""A throwaway PostgreSQL server for tests.

`PgServer.start()` runs initdb + pg_ctl in a fresh temp dir (as the `postgres`
OS user when the tests run as root: the server refuses to run as root),
listening only on 127.0.0.1 and a unix socket in that dir, on a free port,
with trust auth and fsync off (it lives for one test session). `new_db()`
creates an empty database and returns its URL; `stop()` shuts it down and
removes the dir.

Binaries are looked up on PATH, then in /usr/lib/postgresql/*/bin (Debian,
Ubuntu) and /usr/pgsql-*/bin (RHEL); $ZIGGURAT_PG_BIN overrides both.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


class PgUnavailable(RuntimeError):
    """PostgreSQL server binaries cannot be found or used here."""


def find_bin_dir() -> Path:
    env = os.environ.get("ZIGGURAT_PG_BIN")
    candidates = [env] if env else []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    candidates += sorted(glob.glob("/usr/pgsql-*/bin"), key=_version, reverse=True)
    for c in candidates:
        d = Path(c)
        if all((d / b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return d
    raise PgUnavailable("no initdb/pg_ctl/postgres on PATH, in /usr/lib/postgresql/*/bin or /usr/pgsql-*/bin "
                        "(install the postgresql server package, or set ZIGGURAT_PG_BIN)")


def _version(path: str) -> tuple:
    digits = "".join(ch if ch.isdigit() else " " for ch in path).split()
    return tuple(int(d) for d in digits)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, bin_dir: Path, root: Path, port: int, as_user: str | None):
        self.bin, self.root, self.port, self.as_user = bin_dir, root, port, as_user
        self.data = root / "data"
        self._ids = itertools.count()

    @classmethod
    def start(cls) -> "PgServer":
        bin_dir = find_bin_dir()
        as_user = None
        root = Path(tempfile.mkdtemp(prefix="ziggurat-pg-", dir="/tmp"))
        if os.geteuid() == 0:
            import pwd
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(root, ignore_errors=True)
                raise PgUnavailable("running as root and there is no `postgres` OS user to run the server as") from None
            as_user = "postgres"
            os.chown(root, pw.pw_uid, pw.pw_gid)
        srv = cls(bin_dir, root, _free_port(), as_user)
        try:
            srv._run("initdb", "-D", str(srv.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--locale=C", "--no-sync")
            with open(srv.data / "postgresql.conf", "a") as f:
                f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {srv.port}\n"
                        f"unix_socket_directories = '{root}'\n"
                        "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                        "max_connections = 50\nshared_buffers = 32MB\n")
            srv._run("pg_ctl", "-D", str(srv.data), "-l", str(root / "server.log"), "-w", "-t", "30", "start")
        except BaseException as e:
            log = srv.log_tail()
            srv.stop()
            raise RuntimeError(f"could not start PostgreSQL: {e}\n{log}") from e
        return srv

    def _run(self, prog: str, *args: str) -> None:
        cmd = [str(self.bin / prog), *args]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def new_db(self) -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(self._ids)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "".join((self.root / "server.log").read_text().splitlines(keepends=True)[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
