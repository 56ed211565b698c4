"""Where the tail comes from, from the database's side: `python -m bench --diagnose` samples what the
service's connections wait for during each run, and counts checkpoints, autovacuum and autoanalyze
runs, WAL records, the database's commits and the tickets written in the run's window.

A sample every few milliseconds of pg_stat_activity for the server's sessions (application_name
'headoni'): active and waiting on a lock (and which), on the WAL flush, on I/O, or running. What counts
as a stall shows as a share of all samples, so two runs compare.
"""

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg

_SAMPLE: Final = """
SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS waiting
FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'headoni' AND state = 'active'
"""
_COUNTERS: Final = """
SELECT (SELECT coalesce(sum(autovacuum_count), 0) FROM pg_stat_user_tables) AS autovacuums,
       (SELECT coalesce(sum(autoanalyze_count), 0) FROM pg_stat_user_tables) AS autoanalyzes,
       (SELECT wal_records FROM pg_stat_wal) AS wal_records,
       (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) AS commits,
       (SELECT count(*) FROM tickets) AS tickets
"""


@dataclass
class Window:
    """What the database did while one run lasted."""

    samples: int = 0
    states: Counter[str] = field(default_factory=Counter)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        # The average number of the server's sessions in each state: 0.5 means one session half the time.
        shares = ", ".join(f"{name} {n / max(1, self.samples):.2f}" for name, n in self.states.most_common(6))
        moved = {k: self.after.get(k, 0) - self.before.get(k, 0) for k in self.after}
        counts = ", ".join(f"{k} {v:g}" for k, v in moved.items())
        others = moved.get("commits", 0) - self.samples  # each sample is a commit of the sampler's own
        if others > 0:  # the service's statements, and its reads (tokens, rate limits) between them
            counts += f"; tickets per commit of the service {moved.get('tickets', 0) / others:.1f}"
        return [f"    busy sessions on average, by what they wait for ({self.samples} samples): {shares or 'none'}",
                f"    in the window: {counts}"]


async def _counters(conn: asyncpg.Connection) -> dict[str, float]:
    row = await conn.fetchrow(_COUNTERS)
    values = {k: float(v) for k, v in dict(row).items()}
    for view, column in (("pg_stat_checkpointer", "num_timed + num_requested"),
                         ("pg_stat_bgwriter", "checkpoints_timed + checkpoints_req")):
        try:
            values["checkpoints"] = float(await conn.fetchval(f"SELECT {column} FROM {view}"))
            break
        except asyncpg.PostgresError:
            continue
    return values


class Sampler:
    """Samples the database in a thread of its own while a run goes on (`with Sampler(url) as window:`)."""

    def __init__(self, url: str, interval: float = 0.005) -> None:
        self._url = url
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.window = Window()

    def __enter__(self) -> Window:
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(ready)), daemon=True)
        self._thread.start()
        ready.wait(10)
        return self.window

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    async def _run(self, ready: threading.Event) -> None:
        conn = await asyncpg.connect(self._url, server_settings={"application_name": "headoni-bench-sampler"})
        try:
            self.window.before = await _counters(conn)
            ready.set()
            while not self._stop.is_set():
                for (waiting,) in await conn.fetch(_SAMPLE):
                    self.window.states[waiting] += 1
                self.window.samples += 1
                time.sleep(self._interval)
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            self.window.after = await _counters(conn)
        finally:
            ready.set()
            await conn.close()
