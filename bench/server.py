"""A real `headoni serve` process, started by the one launcher of the bench and the test suite, and the memory of
its processes."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil  # type: ignore[import-untyped]

from bench.prefill import BASE_DOMAIN

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def processes(self) -> list[psutil.Process]:
        """The serve process and its uvicorn workers (with --workers 1 the serve process is the worker)."""
        try:
            main = psutil.Process(self.process.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> list[psutil.Process]:
        """The processes that answer requests."""
        procs = self.processes()
        serving = [p for p in procs[1:] if _is_worker(p)]
        return serving or procs[:1]


def _is_worker(p: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" not in " ".join(p.cmdline())
    except psutil.Error:
        return False


def start(
    database_url: str, log: Path, *, workers: int | None = None, args: Sequence[str] = (),
    env: Mapping[str, str] | None = None, access_log: Path | None = None, ready_within: float = 60.0,
) -> Server:
    """Start `headoni serve` on a free port and wait until it answers /readyz (and, with `workers`, until
    that many workers run): the one launcher of the bench and the test suite. `workers` is passed as
    --workers (None: not passed, the default of one process), `args` are more arguments, `env` adds to
    the environment. stderr (start, stop, errors) goes to `log`; stdout, the access log, a line per
    request (hundreds of MB over a bench), is still formatted and written, to `access_log`: /dev/null
    when None, or `log` itself, both streams in one file in the order written."""
    port = free_port()
    environment = {**os.environ, "DATABASE_URL": database_url, "HEADONI_BASE_DOMAIN": BASE_DOMAIN, **(env or {})}
    command = [sys.executable, "-m", "app", "serve", "--port", str(port)]
    command += ["--workers", str(workers)] if workers is not None else []
    with contextlib.ExitStack() as files:  # the child keeps its own descriptors
        err = files.enter_context(log.open("wb"))
        out: IO[bytes] | int = err
        if access_log is None:
            out = files.enter_context(open(os.devnull, "wb"))
        elif access_log != log:
            out = files.enter_context(access_log.open("wb"))
        process = subprocess.Popen(
            [*command, *args], cwd=ROOT, env=environment, stdout=out,
            stderr=subprocess.STDOUT if out is err else err, start_new_session=True,
        )
    server = Server(process, port, log)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"headoni serve exited early:\n{log.read_text(errors='replace')[-3000:]}")
        if get(server.base_url + "/readyz") == 200 and len(server.workers()) >= (workers or 1):
            return server
        time.sleep(0.1)
    stop(server)
    raise RuntimeError(
        f"headoni serve did not get ready in {ready_within:g} s:\n{log.read_text(errors='replace')[-3000:]}"
    )


def stop(server: Server) -> None:
    """SIGTERM (uvicorn shuts down gracefully), then SIGKILL to the process group we started."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(10)


def get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 30.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, body, {**headers, "Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@dataclass
class MemoryWatch:
    """Samples the RSS of the server's processes in a background thread: peak per process, and a
    time series per worker for the soak."""

    server: Server
    interval: float = 0.5
    peak: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (role, bytes)
    series: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "MemoryWatch":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def sample(self) -> None:
        procs = self.server.processes()
        workers = {p.pid for p in self.server.workers()}
        now = time.monotonic()
        for p in procs:
            try:
                rss = int(p.memory_info().rss)
            except psutil.Error:
                continue
            role = "worker" if p.pid in workers else ("supervisor" if p.pid == self.server.process.pid else "helper")
            if rss > self.peak.get(p.pid, ("", 0))[1]:
                self.peak[p.pid] = (role, rss)
            self.series.setdefault(p.pid, []).append((now, rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
