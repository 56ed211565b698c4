"""The HTTP/1.1 protocol `headoni serve` runs: uvicorn's httptools protocol with limits it lacks.

uvicorn bounds the body only through the app (1 MiB, read no further) and the header section not at
all: httptools buffers a header of any size, so one client could make the process hold megabytes per
connection. Here the request head (request line and headers) is bounded: past MAX_HEAD_BYTES the
client gets 431 and the connection is closed, and an unfinished head stops being read at the same
bound. A request with more than one Host header gets 400 (RFC 9112 section 3.2), before the app sees
it: which desk it names would be ambiguous.
"""

from typing import Final

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES: Final = 64 * 1024

_encode: Final = msgspec.json.Encoder().encode


class _Rejected(Exception):
    """Raised from a parser callback to stop parsing a request already answered."""


def _response(status: bytes, code: str, message: str) -> bytes:
    body = _encode({"error": code, "message": message})
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


HEAD_TOO_LARGE: Final = _response(
    b"431 Request Header Fields Too Large",
    "headers_too_large",
    f"The request line and headers are larger than {MAX_HEAD_BYTES // 1024} KiB.",
)
DUPLICATE_HOST: Final = _response(b"400 Bad Request", "bad_request", "The request has more than one Host header.")


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    _head_bytes = 0  # bytes of the head being received, counted as the parser hands them over
    _unparsed_head = 0  # bytes of chunks that ended inside a head: what the parser may be holding
    _in_head = True  # between requests or inside a head; False while a body is being received
    _finished_in_chunk = False
    _rejected = False

    def data_received(self, data: bytes) -> None:
        self._finished_in_chunk = False
        super().data_received(data)
        # A head still unfinished after this whole chunk: bound what the parser keeps buffering.
        if self._in_head and not self._finished_in_chunk and not self._rejected:
            self._unparsed_head += len(data)
            if self._unparsed_head > MAX_HEAD_BYTES:
                self._reject(HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._unparsed_head = 0
        if self._head_bytes > MAX_HEAD_BYTES:
            self._reject(HEAD_TOO_LARGE)
            raise _Rejected()
        if sum(1 for name, _ in self.headers if name == b"host") > 1:
            self._reject(DUPLICATE_HOST)
            raise _Rejected()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._finished_in_chunk = True
        self._unparsed_head = 0

    def send_400_response(self, msg: str) -> None:
        if not self._rejected:  # a request already answered 431 or 400 gets nothing more
            super().send_400_response(msg)

    def _reject(self, response: bytes) -> None:
        self._rejected = True
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(response)
        self.transport.close()
