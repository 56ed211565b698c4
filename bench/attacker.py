"""The hostile client of `python -m bench.hostile`: one process, no token, raw sockets, four attacks at once.

Run as `python -m bench.attacker --port P --seconds S ...`; it prints one JSON line of counters at the end.
Each attack keeps its connections busy for the whole run, opening a new one whenever the server closes one:

- trailers (issue 17, item 1): a chunked POST whose body ends at once (`0\\r\\n`), then trailer lines
  without end.
- metrics (item 2): keep-alive connections looping on `GET /metrics`.
- idle (item 5): connections that send nothing, and connections that send a head one byte a second.
- bodies (item 6): POSTs of a 950 KB create with no token, each sent as fast as the socket takes it.

Its connections come from --source (127.0.0.2: Linux routes all of 127/8 to the loopback), an address
of its own as a remote attacker's would be, not the desk's 127.0.0.1.
"""

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Final

HOST: Final = b"d1001.localhost"
TRAILER_PIECE: Final = b"X-Trailer: " + b"t" * 65_000 + b"\r\n"
BODY_BYTES: Final = 950_000


class Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.closed_after: list[float] = []  # seconds an idle connection stayed open before the server closed it


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Attack = Callable[[Connection, Tally, float], Awaitable[None]]
_GONE: Final = (OSError, asyncio.IncompleteReadError, ValueError, IndexError)  # the server closed it


async def read_answer(reader: asyncio.StreamReader) -> int:
    """Read one answer (head and Content-Length body); return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def again_and_again(
    name: str, attack: Attack, address: tuple[str, int], tally: Tally, deadline: float
) -> None:
    """Run one attack on a connection, and on a new one each time the server closes it, until the deadline."""
    while time.monotonic() < deadline:
        try:
            connection = await asyncio.open_connection("127.0.0.1", address[1], limit=2**20, local_addr=(address[0], 0))
        except OSError:
            tally.counts["connect_failed"] += 1
            await asyncio.sleep(0.05)
            continue
        tally.counts[f"{name}_connections"] += 1
        opened = time.monotonic()
        try:
            await attack(connection, tally, deadline)
        except _GONE:
            pass
        finally:
            connection[1].close()
        if time.monotonic() < deadline:
            tally.counts[f"{name}_closed_by_server"] += 1
            if name in ("silent", "trickle"):
                tally.closed_after.append(time.monotonic() - opened)


async def trailers(connection: Connection, tally: Tally, deadline: float) -> None:
    reader, writer = connection
    writer.write(
        b"POST /api/v1/tickets HTTP/1.1\r\nHost: " + HOST + b"\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n"
    )
    # Until the server answers and closes: asyncio goes on taking writes into a transport the peer has
    # closed for a while, and a loop that does not look would spin on them, not attack.
    while time.monotonic() < deadline and not reader.at_eof() and not writer.is_closing():
        writer.write(TRAILER_PIECE)
        await writer.drain()
        tally.counts["trailer_bytes_written"] += len(TRAILER_PIECE)


async def metrics(connection: Connection, tally: Tally, deadline: float) -> None:
    reader, writer = connection
    while time.monotonic() < deadline:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
        tally.counts[f"metrics_{await read_answer(reader)}"] += 1


async def silent(connection: Connection, tally: Tally, deadline: float) -> None:
    reader, _ = connection
    while time.monotonic() < deadline:
        try:
            if await asyncio.wait_for(reader.read(65536), 1.0) == b"":
                return
        except TimeoutError:
            continue


async def trickle(connection: Connection, tally: Tally, deadline: float) -> None:
    reader, writer = connection
    head = b"POST /api/v1/tickets HTTP/1.1\r\nHost: " + HOST + b"\r\nX-Slow: " + b"s" * 10_000
    for i in range(len(head)):
        if time.monotonic() >= deadline:
            return
        writer.write(head[i : i + 1])
        try:
            if await asyncio.wait_for(reader.read(65536), 1.0) == b"":
                return
        except TimeoutError:
            continue


_BODY: Final = b'{"email": "big@example.com", "subject": "Big", "body": "' + b"b" * (BODY_BYTES - 60) + b'"}'
_BODY_HEAD: Final = (
    b"POST /api/v1/tickets HTTP/1.1\r\nHost: " + HOST + b"\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n"
)


async def bodies(connection: Connection, tally: Tally, deadline: float) -> None:
    reader, writer = connection
    while time.monotonic() < deadline and not writer.is_closing():
        writer.write(_BODY_HEAD + _BODY)
        await writer.drain()
        tally.counts[f"bodies_{await read_answer(reader)}"] += 1


async def attack(args: argparse.Namespace) -> dict[str, object]:
    tally = Tally()
    deadline = time.monotonic() + args.seconds
    plan: list[tuple[str, Attack, int]] = [
        ("trailers", trailers, args.trailers), ("metrics", metrics, args.metrics),
        ("silent", silent, args.idle // 2), ("trickle", trickle, args.idle - args.idle // 2),
        ("bodies", bodies, args.bodies),
    ]
    address = (args.source, args.port)
    tasks = [again_and_again(name, run, address, tally, deadline) for name, run, count in plan for _ in range(count)]
    await asyncio.gather(*tasks)
    closed = sorted(tally.closed_after)
    return {
        "cpu_seconds": round(time.process_time(), 2),
        **tally.counts,
        "idle_closed_after_max_s": round(closed[-1], 2) if closed else None,
        "idle_closed_after_median_s": round(closed[len(closed) // 2], 2) if closed else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.attacker", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--source", default="127.0.0.2", help="the address it connects from (127.0.0.2)")
    p.add_argument("--trailers", type=int, default=4, help="connections sending endless trailers (4)")
    p.add_argument("--metrics", type=int, default=50, help="connections looping on GET /metrics (50)")
    p.add_argument("--idle", type=int, default=1000, help="idle or trickling connections (1000)")
    p.add_argument("--bodies", type=int, default=300, help="connections sending 950 KB creates (300)")
    args = p.parse_args()
    print(json.dumps(asyncio.run(attack(args))), flush=True)


if __name__ == "__main__":
    main()
