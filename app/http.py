"""The HTTP/1.1 protocol `headoni serve` runs: uvicorn's httptools protocol with the limits it lacks.

Every limit holds before the app runs, for clients with or without a token, and every answer given
here is JSON in the contract's shape with an X-Request-Id, counted and logged like the app's own:

- The request head (request line and headers) and, for a chunked body, its trailers: past
  MAX_HEAD_BYTES together, 431 and the connection is closed; an unfinished head or trailer stops
  being read at the same bound. Trailers are counted and dropped, never added to the headers.
- Time: a connection must send a whole head within HEADONI_HEAD_TIMEOUT_SECONDS of opening or of its
  previous answer (else 408, or a silent close when it sent nothing), and a whole body within
  HEADONI_BODY_TIMEOUT_SECONDS of starting (else 408, or a close when the answer has gone out).
- Connections: at most HEADONI_MAX_CONNECTIONS per process; past it a new one evicts the connection
  that has waited longest with no answer owed (app/limits.py), and is refused with 503 only when every
  connection is owed one.
- Per client address: at most HEADONI_ADDRESS_RATE new connections a second are read, and anonymous
  requests (below) after a connection's first start at most as fast, together, in bursts of as many;
  the others wait their turn unread, first come first served. A waiting connection may be evicted
  (answered 503 if it has a request waiting), and is answered 503 if its head's time runs out before
  its turn. A connection whose request carries a token the process knows gives its turn back, so a
  client that opens connections as fast as it is answered (401, 503, nothing) or loops on anonymous
  requests is held to the rate, and one with a valid token is not held back by the connections it opens.
- Request bytes: bodies held at once fit HEADONI_REQUEST_BYTES_BUDGET_MB; a request whose body does
  not fit gets a fast 503 with Retry-After, its body read and dropped.
- Fairness: requests without a token this process knows (unauthenticated, health, metrics, docs) run
  at most HEADONI_ANONYMOUS_CONCURRENCY at a time and start at most HEADONI_ANONYMOUS_RATE per second,
  the rest waiting their turn with reading paused, so a flood of them cannot starve the desks that
  authenticate.
- Strict heads: more than one Host or Authorization header, a Host that is not host[:port], or an
  absolute-form target that is not http(s) with a valid authority: 400. An absolute-form target's
  authority replaces the Host header (RFC 9112 section 3.2.2).
"""

import asyncio
import functools
import time
from collections import deque
from typing import Any, Final, cast

import httptools
import msgspec
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from app import observability, settings
from app.auth import SCOPE_TOKEN_KEY, token_key, valid_host
from app.errors import (
    SCOPE_ADMISSION,
    ApiError,
    BadRequest,
    ErrorBody,
    HeadersTooLarge,
    RequestTimeout,
    ServiceUnavailable,
)
from app.limits import AddressGates, ByteBudget, ConnectionTable, Gate, raise_file_limit
from app.services import of_state
from app.validation import MAX_BODY_BYTES

MAX_HEAD_BYTES: Final = 64 * 1024
# Chunk framing (size line and CRLFs) counts against the head bound beyond this much per chunk.
CHUNK_FRAMING: Final = 32
# The app's own 408 (app/intake.py read_body) answers at HEADONI_BODY_TIMEOUT_SECONDS while it reads;
# the protocol closes a body still unfinished this much later, whichever path the request took.
BODY_GRACE_SECONDS: Final = 0.5
# A body still arriving after its answer has gone out is read (and dropped) to keep the connection
# only when at most this much of it is left; a longer rest would cost the loop for nothing, so the
# connection is half-closed instead, reading stops, and it is closed LINGER_SECONDS later, time for the
# client to read the answer before the reset that unread data brings (as Go's net/http does).
DRAIN_LIMIT: Final = 256 * 1024
LINGER_SECONDS: Final = 1.0
# An anonymous request holds its turn (HEADONI_ANONYMOUS_CONCURRENCY) until it ends or for this long.
GATE_HOLD_SECONDS: Final = 0.1

_encode: Final = msgspec.json.Encoder().encode

# Where a connection is in its current request.
HEAD: Final = "head"  # waiting for a request, or inside its head
BODY: Final = "body"  # the app has the request; its body (and trailers) may still be arriving
DISCARD: Final = "discard"  # answered here, without the app: its body is read and dropped, then closed


# What the HTTP layer answers itself; each an ApiError, rendered as the app renders them.
DUPLICATE_HOST: Final = BadRequest("The request has more than one Host header.")
DUPLICATE_AUTHORIZATION: Final = BadRequest("The request has more than one Authorization header.")
BAD_HOST: Final = BadRequest("The Host header is not a valid host[:port].")
BAD_TARGET: Final = BadRequest("The request target must be a path, or an http(s) URL naming a valid host.")
HEAD_TOO_LARGE: Final = HeadersTooLarge(
    f"The request line, headers and trailers are larger than {MAX_HEAD_BYTES // 1024} KiB."
)
HEAD_TIMEOUT: Final = RequestTimeout("The request head did not arrive in time.")
OVER_BUDGET: Final = ServiceUnavailable("Too many request bodies are in flight; retry shortly.")
TOO_MANY_CONNECTIONS: Final = ServiceUnavailable("Too many connections are open; retry shortly.")
ADDRESS_BUSY: Final = ServiceUnavailable(
    "Connections from this address arrive faster than HEADONI_ADDRESS_RATE; retry shortly."
)


class _Rejected(Exception):
    """Raised from a parser callback to stop parsing a request already answered."""


class _Process:
    """What all connections of this process share: the settings and the limits' bookkeeping."""

    def __init__(self) -> None:
        self.config = settings.load()
        self.connections: ConnectionTable[BoundedHttpToolsProtocol] = ConnectionTable(
            raise_file_limit(self.config.max_connections)
        )
        self.budget = ByteBudget(self.config.request_bytes_budget)
        self.anonymous = Gate(self.config.anonymous_concurrency, self.config.anonymous_rate)
        rate = self.config.address_rate
        self.addresses = AddressGates(rate) if rate > 0 else None


@functools.cache
def _process() -> _Process:
    return _Process()


class OneWrite:
    """A response's transport that sends its head with the first write of its body: most answers then
    leave in one write, one system call and one packet, where uvicorn writes the head and the body apart.
    An interim 100 Continue goes out at once (the client waits for it before it sends the body)."""

    __slots__ = ("_head", "_started", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._started = False  # the head has been written (held, or sent)

    def write(self, data: bytes) -> None:
        if not self._started and not data.startswith(b"HTTP/1.1 100 "):
            self._started, self._head = True, data  # the first write of a response is its head
            return
        head, self._head = self._head, None
        self._transport.write(head + data if head else data)

    def close(self) -> None:
        if self._head:
            head, self._head = self._head, None
            self._transport.write(head)
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.shared = _process()
        self._timer: asyncio.TimerHandle | None = None
        self._reserved: deque[int] = deque()  # body bytes reserved by each request not yet answered
        self._began = time.perf_counter()
        self._phase = HEAD
        self._head_bytes = 0  # bytes of the head (or trailers) seen in parser callbacks
        self._nonbody = 0  # bytes of the current message that were not body: head, framing, trailers
        self._body_bytes = 0  # body bytes received on the connection, all requests together
        self._body_end = 0  # the value _body_bytes will have when the current body is complete
        self._chunks = 0
        self._head_started = False
        self._finished_in_chunk = False
        self._rejected = False  # answered and closing: nothing more is read
        self._deferred: ApiError | None = None  # an answer to give once the earlier one has gone out
        self._address = ""  # the client's address, as AddressGates counts it
        self._held = False  # waiting, unread, for its address's turn
        self._turn_given_back = False  # its address's turn went back, for a token the process knows
        self._early = b""  # what a held connection sent before its reading could be paused
        self._anonymous_requests = 0  # requests on the connection that started without a known token
        self._waiting_for_address = False  # a request of it waits for its address's turn (it is evictable)

    # Connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.shared.connections.admit(self, BoundedHttpToolsProtocol.evict):
            self._rejected = True
            self._write(TOO_MANY_CONNECTIONS, None)
            self.transport.close()
            return
        # The head's time runs from the opening, whether the connection waits for its address's turn or
        # not: it is answered or closed within HEADONI_HEAD_TIMEOUT_SECONDS whatever its address does.
        self._wait_for_head()
        gates = self.shared.addresses
        if gates is None:
            return
        self._address = gates.key(self.client[0] if self.client else None)
        self._held = True
        gates.enter(self._address, self._let_in)
        if self._held:  # over its address's rate: nothing of it is read until its turn
            # uvloop starts reading after connection_made, whatever it said: pause before the next poll
            self.loop.call_soon(self._pause_held)

    def _pause_held(self) -> None:
        if self._held and not self.transport.is_closing():
            self.flow.pause_reading()

    def _let_in(self) -> bool:
        """Its address's turn has come: read it from now on (False when it was closed meanwhile)."""
        if self._rejected or self.transport.is_closing():
            return False
        if self._held:
            self._held = False
            self.flow.resume_reading()
        early, self._early = self._early, b""
        if early:
            self.data_received(early)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.shared.connections.forget(self)
        self._cancel_timer()
        while self._reserved:
            self.shared.budget.release(self._reserved.popleft())
        super().connection_lost(exc)

    def evict(self) -> None:
        """Closed to make room for a new connection; a request of it waiting for its address's turn is
        answered 503 first."""
        if self._waiting_for_address:  # its app never started: the answer is this one, then a close
            self._waiting_for_address = False
            self._write(ADDRESS_BUSY, self.headers)
            self._linger()  # from here nothing is read, and its timer is the close's
        else:
            self.close_quietly()

    def close_quietly(self) -> None:
        self._rejected = True
        self._cancel_timer()
        self.transport.close()

    def _wait_for_head(self) -> None:
        self.shared.connections.evictable(self)
        self._set_timer(self.shared.config.head_timeout_seconds, self._head_timed_out)

    def _head_timed_out(self) -> None:
        if self._held:  # its address's turn did not come in time: 503, nothing of it read
            self._reject(ADDRESS_BUSY)
        elif self._head_started:
            self._reject(HEAD_TIMEOUT)
        else:  # it sent nothing: close, as for an idle keep-alive connection
            self.close_quietly()

    def _body_timed_out(self) -> None:
        self._reject(RequestTimeout())

    def _set_timer(self, seconds: float, callback: Any) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(seconds, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # Bytes in

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._held:  # read before the pause took: kept for its turn (one read at most)
            self._early += data
            self.flow.pause_reading()
            return
        self._unset_keepalive_if_required()
        self._finished_in_chunk = False
        if self._phase == HEAD:
            self._head_started = True
        body_before = self._body_bytes
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade (WebSocket) request: it has been answered as a plain request; nothing after it
            # on this connection can be parsed, so the connection closes after that answer.
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False
            else:
                self.close_quietly()
            return
        except httptools.HttpParserError:
            self._reject(BadRequest())  # a no-op when a callback already answered and raised _Rejected
            return
        if self._rejected or self._finished_in_chunk:
            return
        # The message goes on past this chunk: count what of it was not body, which is what the parser
        # may be holding (a partial header or trailer) or has framed (chunk sizes and extensions).
        self._nonbody += len(data) - (self._body_bytes - body_before)
        if self._nonbody > MAX_HEAD_BYTES + CHUNK_FRAMING * self._chunks:
            self._reject(HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began = time.perf_counter()
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        if self._phase == HEAD:  # else a trailer field: counted, never added to the request's headers
            super().on_header(name, value)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_headers_complete(self) -> None:
        self._cancel_timer()
        hosts = [value for name, value in self.headers if name == b"host"]
        if len(hosts) > 1:
            self._refuse(DUPLICATE_HOST)
        if sum(1 for name, _ in self.headers if name == b"authorization") > 1:
            self._refuse(DUPLICATE_AUTHORIZATION)
        if not self.url.startswith(b"/"):
            self._use_target_authority()
        elif hosts and hosts[0] and not valid_host(hosts[0].decode("latin-1")):
            self._refuse(BAD_HOST)
        size = self._declared_body()
        self._body_end = self._body_bytes + size
        if size and not self.shared.budget.reserve(size):
            self._answer_here(OVER_BUDGET)
            return
        self._reserved.append(size)
        self._phase = BODY
        try:
            super().on_headers_complete()  # makes the request's cycle, and starts (or queues) its task
        except BaseException:
            self._phase = HEAD
            self.shared.budget.release(self._reserved.pop())
            raise
        self.cycle.transport = OneWrite(self.transport)  # type: ignore[assignment]
        self.shared.connections.owed(self)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._phase == BODY:
            super().on_body(body)

    def on_message_complete(self) -> None:
        discarded = self._phase == DISCARD
        self._phase = HEAD
        self._head_started = False
        self._finished_in_chunk = True
        self._nonbody = self._chunks = 0
        self._cancel_timer()
        if discarded:  # answered here with Connection: close; its body has now been read
            self.close_quietly()
            return
        super().on_message_complete()
        if self.cycle.response_complete and not self.pipeline:
            self._wait_for_head()

    # Answers out

    def on_response_complete(self) -> None:
        if self._reserved:
            self.shared.budget.release(self._reserved.popleft())
        if self._deferred is not None:
            self._write(self._deferred, self.headers)
            self.transport.close()
            return
        if self._rejected:  # closing or lingering: nothing more is read (uvicorn's would resume reading)
            return
        if self.cycle.response_complete and self._phase == BODY and self._body_end - self._body_bytes > DRAIN_LIMIT:
            self._linger()  # the answer went out before the request's body, and much of it is still to come
            return
        admission: Any = self.cycle.scope.get(SCOPE_ADMISSION) if not self.pipeline else None
        if admission is not None and admission.pause > 0:
            # After a 429 or a shed 503 the connection is read again only once its pause is over
            # (app/limiter.py): a client that ignores Retry-After cannot keep the loop busy.
            self.flow.pause_reading()
            self.loop.call_later(admission.pause, self._read_on)
            return
        self._read_on()

    def _read_on(self) -> None:
        """What follows an answer: read the next request (uvicorn's own), and wait for its head."""
        if self.transport.is_closing():
            return
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle.response_complete:  # no later request (pipelined) is running
            self.shared.connections.evictable(self)
            if self._phase == HEAD:  # the request's body is all in: wait for the next head
                self._wait_for_head()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if self._known_client(cast("dict[str, Any]", cycle.scope)):  # a key of ours is added to it
            if self.shared.addresses is not None and not self._turn_given_back:
                self._turn_given_back = True
                self.shared.addresses.give_back(self._address)
            self._run(cycle, app, gated=False)
            return
        self.flow.pause_reading()  # while it waits its turn, nothing more of it is read
        self._anonymous_requests += 1
        gates = self.shared.addresses
        # The connection's first request had its address's turn as the connection opened, unless given back.
        if gates is not None and (self._anonymous_requests > 1 or self._turn_given_back):
            # Over its address's rate it is the client's own wait: the connection may be evicted meanwhile.
            self._waiting_for_address = True
            self.shared.connections.evictable(self)
            gates.enter(self._address, lambda: self._wait_anonymous(cycle, app))
        else:
            self._wait_anonymous(cycle, app)

    def _wait_anonymous(self, cycle: RequestResponseCycle, app: ASGI3Application) -> bool:
        """Queue the request for an anonymous turn (False if the connection was closed meanwhile)."""
        if self._rejected or self.transport.is_closing():
            return False
        if self._waiting_for_address:
            self._waiting_for_address = False
            self.shared.connections.owed(self)
        self.shared.anonymous.enter(lambda: self._run(cycle, app, gated=True))
        return True

    def _run(self, cycle: RequestResponseCycle, app: ASGI3Application, *, gated: bool) -> bool:
        if self._rejected or self.transport.is_closing():  # answered here meanwhile (and lingering): not read again
            return False
        if self._phase == BODY:  # its body is still to come: from now on it has a bound
            self._set_timer(self.shared.config.body_timeout_seconds + BODY_GRACE_SECONDS, self._body_timed_out)
        self.flow.resume_reading()
        task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        if gated:  # its turn ends when it does, or after GATE_HOLD_SECONDS (a slow body must not hold it)
            turn = self.shared.anonymous.turn(self.loop, GATE_HOLD_SECONDS)
            task.add_done_callback(turn)
        self.tasks.add(task)
        return True

    def _known_client(self, scope: dict[str, Any]) -> bool:
        """Whether the request carries a token this process has seen valid (the app still checks it). The
        token's key is left in the scope, where the app's authorization takes it (app/operations.py)."""
        authorization = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        key = scope[SCOPE_TOKEN_KEY] = token_key(authorization.decode("latin-1") if authorization else None)
        found = of_state(self.app_state)
        return key is not None and found is not None and found.tokens.known(key)

    def _unsupported_upgrade_warning(self) -> None:
        pass  # the request is answered as a plain one (and logged as such); nothing to warn about

    def send_400_response(self, msg: str) -> None:
        self._reject(BadRequest())

    # Helpers

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._reject(HEAD_TOO_LARGE)
            raise _Rejected()

    def _declared_body(self) -> int:
        """The body size to reserve: its Content-Length, or the most the app reads when chunked."""
        for name, value in self.headers:
            if name == b"content-length":
                return min(int(value), MAX_BODY_BYTES + 1) if value.isdigit() else 0
            if name == b"transfer-encoding":
                return MAX_BODY_BYTES
        return 0

    def _use_target_authority(self) -> None:
        """An absolute-form target (`POST http://acme.headoni.app/api/v1/tickets`): its authority is the
        host the request is for, whatever the Host header says (RFC 9112 section 3.2.2)."""
        try:
            target = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._refuse(BAD_TARGET)
        authority = target.host or b""
        if target.port is not None:
            authority += b":" + str(target.port).encode()
        scheme = (target.schema or b"").lower()
        if scheme not in (b"http", b"https") or target.userinfo or not valid_host(authority.decode("latin-1")):
            self._refuse(BAD_TARGET)
        self.headers[:] = [(name, value) for name, value in self.headers if name != b"host"]
        self.headers.append((b"host", authority))

    def _refuse(self, answer: ApiError) -> None:
        self._reject(answer)
        raise _Rejected()

    def _answer_here(self, answer: ApiError) -> None:
        """Answer the request whose head just ended, without the app, keeping the connection until its
        body has been read (and dropped), so that the client sees the answer rather than a reset."""
        if self.cycle is not None and not self.cycle.response_complete:  # an earlier answer is going out
            self._reject(answer)
            return
        self._write(answer, self.headers)
        if self._body_end - self._body_bytes > DRAIN_LIMIT:
            self._linger()
        else:
            self._phase = DISCARD
            self._set_timer(self.shared.config.body_timeout_seconds, self.close_quietly)

    def _linger(self) -> None:
        """Stop reading, send FIN after the answer, and close a moment later (see DRAIN_LIMIT)."""
        self._rejected = True
        self.shared.connections.evictable(self)
        self.flow.pause_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._set_timer(LINGER_SECONDS, self.close_quietly)

    def _reject(self, answer: ApiError) -> None:
        """Answer (when nothing else has been or is being answered on the connection) and close."""
        if self._rejected:
            return
        self._rejected = True
        self._cancel_timer()
        cycle = self.cycle
        if self._phase == HEAD:  # the request has no cycle yet: answer now, or after the earlier answer
            can_answer = cycle is None or cycle.response_complete
            if not can_answer:
                self._deferred = answer
                self.flow.pause_reading()
                return
        elif self._phase == BODY:  # answer unless the app has started to
            can_answer = not cycle.response_started
            if not cycle.response_complete:
                cycle.disconnected = True  # the app's answer, if any, goes nowhere; its body read ends
                cycle.message_event.set()
                if self._reserved:  # the current request's, the last one: it is read no further
                    self.shared.budget.release(self._reserved.pop())
        else:  # DISCARD: answered already
            can_answer = False
        if can_answer:
            self._write(answer, self.headers)
            self._linger()  # the client may still be sending: a close now would reset the answer away
        else:
            self.transport.close()

    def _write(self, answer: ApiError, headers: list[tuple[bytes, bytes]] | None) -> None:
        request_id = observability.request_id_of(headers)
        body = _encode(ErrorBody(error=answer.code, message=answer.message))
        head = [STATUS_LINE[answer.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        for text_name, text_value in answer.headers.items():
            if text_name.lower() != "connection":  # always close, below
                head += [text_name.lower().encode(), b": ", text_value.encode(), b"\r\n"]
        head += [
            b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
            b"\r\nx-request-id: ", request_id.encode(), b"\r\nx-content-type-options: nosniff\r\n",
            b"connection: close\r\n\r\n", body,
        ]
        self.transport.write(b"".join(head))
        method, path = self._request_line()
        seconds = time.perf_counter() - self._began
        observability.record_answer(request_id, method, path, answer.status, answer.code, seconds)

    def _request_line(self) -> tuple[str | None, str | None]:
        url: bytes = getattr(self, "url", b"")
        if not url:
            return None, None
        try:
            path = httptools.parse_url(url).path.decode("latin-1")
        except httptools.HttpParserInvalidURLError:
            path = url[:200].decode("latin-1")
        return self.parser.get_method().decode("latin-1"), path
