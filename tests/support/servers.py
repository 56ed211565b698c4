"""A real `headoni serve` process for a test, started and stopped by bench/server.py's launcher."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import server
from bench.server import Server


@contextmanager
def serving(database_url: str, log: Path, *args: str, workers: int | None = None, **env: str) -> Iterator[Server]:
    """`headoni serve` on database_url for the duration of the block, with these extra arguments and
    environment variables (and `--workers`, waited for, when given). Its access log and its errors both go
    to `log`, in the order written, for the tests that read them."""
    srv = server.start(database_url, log, workers=workers, args=args, env=env, access_log=log)
    try:
        yield srv
    finally:
        server.stop(srv)
