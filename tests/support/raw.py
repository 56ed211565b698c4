"""Raw HTTP/1.1 over a socket: requests no client library would send, and what came back."""

import asyncio
import json
import re

from bench.server import Server
from tests.support.desks import Desk

READ_TIMEOUT = 5.0  # a server that neither answers nor closes within this fails the test


class Exchange:
    """What came back on one connection: the bytes, and whether the server closed it."""

    def __init__(self, data: bytes, closed: bool) -> None:
        self.data, self.closed = data, closed

    @property
    def statuses(self) -> list[int]:
        """The status of each answer, in order (an answer may follow the previous body on its line)."""
        return [int(status) for status in re.findall(rb"HTTP/1\.1 ([0-9]{3}) ", self.data)]

    def header(self, name: str) -> list[str]:
        """The values of a header, in every answer."""
        pattern = rb"(?im)^" + re.escape(name.encode()) + rb": *([^\r\n]*)\r$"
        return [value.decode("latin-1") for value in re.findall(pattern, self.data)]

    def json(self) -> dict[str, object]:
        body = self.data.split(b"\r\n\r\n", 1)[1]
        parsed: dict[str, object] = json.loads(body)
        return parsed


async def connect(server: Server, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the server from the address `source` (any of 127/8: Linux routes them all to the
    loopback), so that a test can be several clients as the server tells them apart."""
    return await asyncio.open_connection("127.0.0.1", server.port, local_addr=(source, 0))


async def exchange(
    server: Server, *parts: bytes, delay: float = 0.0, until_closed: bool = True, source: str = "127.0.0.1"
) -> Exchange:
    """Send the parts (with a pause between them) from the address `source` (see `connect`), then read
    until the server closes the connection or stops sending; a server that does neither within
    READ_TIMEOUT fails the test."""
    reader, writer = await connect(server, source)
    try:
        for i, part in enumerate(parts):
            if i and delay:
                await asyncio.sleep(delay)
            writer.write(part)
            try:
                await writer.drain()
            except ConnectionError:
                break  # the server closed the connection while we were still sending: an answer too
        data = b""
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT if until_closed else 0.5)
            except TimeoutError:
                assert not until_closed, f"the server neither answered nor closed: {data[:300]!r}"
                return Exchange(data, closed=False)
            except ConnectionError:
                return Exchange(data, closed=True)
            if not chunk:
                return Exchange(data, closed=True)
            data += chunk
    finally:
        writer.close()


def request(method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + body


def ticket(desk: Desk, body: bytes, *extra: tuple[str, str], length: int | None = None) -> bytes:
    headers = [("Host", desk.host), ("Authorization", f"Bearer {desk.secret}"), ("Content-Type", "application/json")]
    if length is not None:
        headers.append(("Content-Length", str(length)))
    return request("POST", "/api/v1/tickets", [*headers, *extra], body)
