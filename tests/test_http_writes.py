"""app/http.py's OneWrite: a response's head waits for its body's first write, so both leave together."""

import asyncio

from app.http import OneWrite


class Recorder(asyncio.Transport):
    """A transport that keeps what it is given (what the protocol would have sent)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_a_response_leaves_in_one_write_and_a_100_continue_at_once() -> None:
    transport = Recorder()
    out = OneWrite(transport)
    out.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    out.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n")
    assert len(transport.writes) == 1  # the head waits for the body
    out.write(b"{}")
    out.write(b"more")
    assert transport.writes[1:] == [b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}", b"more"]


def test_a_head_still_held_goes_out_before_the_connection_closes() -> None:
    transport = Recorder()
    out = OneWrite(transport)
    out.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    out.close()
    assert transport.writes == [b"HTTP/1.1 500 Internal Server Error\r\n\r\n"] and transport.closed
