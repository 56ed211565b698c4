"""What one server process lets all its clients hold at once: connections, and request bytes.

Both are bookkeeping for app/http.py, which calls them from the protocol's callbacks (one event loop
per process, so no locks). Neither depends on the client being authenticated: both are checked before
the app runs.
"""

import asyncio
import ipaddress
import resource
import time
from collections import deque
from collections.abc import Callable
from typing import Final, Generic, TypeVar

from app.validation import MAX_BODY_BYTES

T = TypeVar("T")

# Bodies up to this size are "small": they may use the whole budget, while larger ones may fill only
# LARGE_SHARE of it, so clients sending big bodies cannot starve ordinary creates.
SMALL_BODY: Final = 64 * 1024
LARGE_SHARE: Final = 0.75


class ConnectionTable(Generic[T]):
    """The open connections of the process, at most `limit`, and which of them may be evicted.

    A connection is evictable while no answer is owed on it: it is idle, or still sending a request
    head, or sending a body whose answer has already gone out. Past the limit a new connection
    evicts the one that has been evictable longest; only when every connection is owed an answer is
    the new one refused. So a flood of idle or trickling connections costs each other client nothing
    but the attacker's own oldest connection.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: set[T] = set()
        self._evictable: dict[T, None] = {}  # insertion order: evictable since longest first

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, conn: T, evict: Callable[[T], None]) -> bool:
        """Take a new connection, evicting the longest-evictable one past the limit; False to refuse it."""
        if len(self._open) >= self.limit:
            if not self._evictable:
                return False
            victim = next(iter(self._evictable))
            self.forget(victim)
            evict(victim)
        self._open.add(conn)
        self._evictable[conn] = None
        return True

    def evictable(self, conn: T) -> None:
        if conn in self._open:
            self._evictable.pop(conn, None)
            self._evictable[conn] = None

    def owed(self, conn: T) -> None:
        """An answer is owed on the connection: it is not evicted until it is given."""
        self._evictable.pop(conn, None)

    def forget(self, conn: T) -> None:
        self._open.discard(conn)
        self._evictable.pop(conn, None)


class ByteBudget:
    """Request body bytes the process holds at once, at most `limit`: a request reserves its body's
    size (its Content-Length, or the 1 MiB maximum when chunked) before the app runs, and gives it back
    when its answer has gone out. A reservation that does not fit is refused: answered 503."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, size: int) -> bool:
        size = min(size, MAX_BODY_BYTES)
        room = self.limit if size <= SMALL_BODY else int(self.limit * LARGE_SHARE)
        if self.held + size > room:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= min(size, MAX_BODY_BYTES)


class Gate:
    """At most `limit` of the requests given to it run at once (no bound when None), and at most `rate`
    start per second, with bursts of up to `burst` (a tenth of the rate, or the limit, when None); the
    others wait their turn, first come first served. Each waiting request is a connection whose reading
    is paused, so the queue is bounded by the connections."""

    def __init__(self, limit: int | None, rate: float, burst: float | None = None) -> None:
        self.limit = limit
        self.rate = rate
        self.running = 0
        self._burst = burst if burst is not None else max(float(limit or 1), rate / 10)
        self._tokens = self._burst
        self._stamp = time.monotonic()
        self._waiting: deque[Callable[[], bool]] = deque()
        self._wake: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def enter(self, start: Callable[[], bool]) -> None:
        """Run `start` now if there is room, else when there is; it returns False if it had nothing to run,
        else the request it started must end its turn (see `turn`) when the gate has a limit."""
        self._waiting.append(start)
        self._start_waiting()

    def turn(self, loop: asyncio.AbstractEventLoop, hold: float) -> Callable[..., None]:
        """The end of a started request's turn: call it when the request ends; it ends by itself after `hold`
        seconds, so that a request that runs long (a slow body) lets the next ones start."""
        timer: asyncio.TimerHandle | None = None

        def end(*_: object) -> None:
            nonlocal timer
            if timer is not None:
                timer.cancel()
                timer = None
                self.running -= 1
                self._start_waiting()

        timer = loop.call_later(hold, end)
        return end

    def give_back(self) -> None:
        """A started one turned out not to count against the rate: its token returns."""
        self._tokens = min(self._burst, self._tokens + 1)
        self._start_waiting()

    def full(self) -> bool:
        """Nobody waits or runs, and the rate has come back whole: the gate is as new."""
        self._refill()
        return not self._waiting and not self.running and self._tokens >= self._burst

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def _start_waiting(self) -> None:
        while self._waiting and (self.limit is None or self.running < self.limit):
            self._refill()
            if self._tokens < 1:  # over the rate: start the next one when a token has come in
                if self._wake is None:
                    self._wake = asyncio.get_running_loop().call_later((1 - self._tokens) / self.rate, self._woken)
                return
            if self._waiting.popleft()():
                self._tokens -= 1
                if self.limit is not None:
                    self.running += 1

    def _woken(self) -> None:
        self._wake = None
        self._start_waiting()


class AddressGates:
    """A Gate per client address, for the connections it opens: at most `rate` a second start to be read
    (bursts of `rate`), the others wait unread, first come first served. A connection that shows a token
    the process knows gives its turn back (`give_back`), so only connections that never do count: a client
    opening connections as fast as it likes, to be answered 401, 503 or nothing, is slowed to the rate
    without a byte of it read, while clients with valid tokens are not held back by their own connections.

    IPv6 addresses count by their /64, the block one host is given. Gates that are as new are forgotten
    every SWEEP_EVERY admissions, so the table holds the addresses seen lately, not all ever seen."""

    SWEEP_EVERY: Final = 4096

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._gates: dict[str, Gate] = {}
        self._admitted = 0

    def __len__(self) -> int:
        return len(self._gates)

    @staticmethod
    def key(host: str | None) -> str:
        if host and ":" in host:
            try:
                address = ipaddress.IPv6Address(host.split("%", 1)[0])
            except ValueError:
                return host
            if address.ipv4_mapped is not None:  # an IPv4 client of a dual-stack listener
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, 64), strict=False).network_address)
        return host or ""

    def enter(self, key: str, start: Callable[[], bool]) -> None:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = Gate(None, self.rate, burst=max(1.0, self.rate))
        self._admitted += 1
        if self._admitted % self.SWEEP_EVERY == 0:
            self._sweep()
        gate.enter(start)

    def give_back(self, key: str) -> None:
        gate = self._gates.get(key)
        if gate is not None:
            gate.give_back()

    def _sweep(self) -> None:
        for key in [key for key, gate in self._gates.items() if gate.full()]:
            del self._gates[key]


def raise_file_limit(connections: int) -> int:
    """Raise the soft limit on open files so that `connections` sockets fit beside the pool and the
    process's own files (up to the hard limit); return how many connections now fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return connections if soft == resource.RLIM_INFINITY else min(connections, soft - 256)
