"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1, between real offices and a real hub.

:class:`FaultProxy` listens on a loopback port and forwards each request to the hub
(``upstream``), on a fresh upstream connection per request (sent with ``Connection:
close``, the answer read to its end). Towards the office it speaks HTTP/1.1 with
keep-alive: requests are framed by ``Content-Length`` (httpx sends one for every body
fieldsync makes); a chunked request is not supported and its connection is closed.

Per request, with probability ``rate`` and the relative ``weights`` of each kind, it
injects one fault:

- ``refuse``: close the connection at once (on a fresh connection, before reading
  anything; on a kept-alive one, after reading the request, without answering);
- ``cut``:    forward the headers and part of the body, then close both sides;
- ``drop``:   forward the whole request, read the hub's whole answer (the hub has
  committed), then close the office's connection without sending it;
- ``delay``:  wait some tens of milliseconds, then forward normally;
- ``503``:    answer ``503 Service Unavailable`` itself; the hub never sees the request.

When the hub cannot be reached (it is down, or it dies while answering) the office's
connection is closed without an answer. :meth:`FaultProxy.heal` passes everything
from then on. Every socket read has a timeout; the proxy runs its own event loop in a
daemon thread, and draws every decision from one seeded ``random.Random``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FAULTS = ("refuse", "cut", "drop", "delay", "503")
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "refuse": 1.0,
    "cut": 1.0,
    "drop": 1.25,
    "delay": 1.0,
    "503": 0.75,
}
# Faults after which the office gets no answer from the hub (a delay still gets one).
FAILING = frozenset(FAULTS) - {"delay"}

_SERVICE_UNAVAILABLE = (
    b'{"error": "unavailable", "detail": "the fault proxy answered 503 (injected)"}'
)
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection"}


@dataclass(frozen=True)
class ProxyStats:
    """What the proxy has seen so far.

    ``requests`` counts request attempts: every request read, plus every connection
    refused before its request was read. ``faults`` counts injected faults by kind;
    ``outcomes`` what else happened (``answered``: the hub's answer reached the office,
    ``upstream_down``: the hub could not be reached, ``upstream_lost``: it closed without
    a whole answer, ``unsupported``: a request the proxy cannot frame).
    """

    requests: int
    faults: Mapping[str, int]
    outcomes: Mapping[str, int]
    paths: Mapping[str, int]
    errors: tuple[str, ...] = field(default=())

    @property
    def disrupted(self) -> int:
        """Requests the proxy disrupted on purpose, delays included."""
        return sum(self.faults.values())

    @property
    def failed(self) -> int:
        """Requests the proxy made fail on purpose (no answer from the hub reached the office)."""
        return sum(n for kind, n in self.faults.items() if kind in FAILING)

    def summary(self) -> str:
        faults = ", ".join(f"{k} {self.faults.get(k, 0)}" for k in FAULTS)
        outcomes = ", ".join(f"{k} {n}" for k, n in sorted(self.outcomes.items()))
        share = self.failed / self.requests if self.requests else 0.0
        return (
            f"{self.requests} requests, {self.disrupted} disrupted ({faults}); "
            f"{self.failed} made to fail ({share:.1%}); {outcomes}"
        )


@dataclass
class _Request:
    head: bytes  # request line and headers, up to and including the blank line
    body: bytes
    path: str
    keep_alive: bool
    client: str  # a hash of the Authorization header ("" without one)


class _Close(Exception):
    """Close the office's connection (the reason has been counted)."""


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 that injects faults at random; see the module doc."""

    def __init__(
        self,
        upstream_port: int,
        *,
        seed: int,
        rate: float = 0.3,
        weights: Mapping[str, float] | None = None,
        delay_ms: tuple[float, float] = (10.0, 80.0),
        upstream_host: str = "127.0.0.1",
        timeout: float = 30.0,
        upstream_timeout: float = 60.0,
    ) -> None:
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        unknown = set(weights) - set(FAULTS)
        if unknown or not 0.0 <= rate <= 1.0 or any(w < 0 for w in weights.values()):
            raise ValueError(f"bad fault settings: rate {rate}, weights {weights}")
        if rate > 0 and sum(weights.values()) <= 0:
            raise ValueError("at least one fault needs a positive weight")
        self.upstream = (upstream_host, upstream_port)
        self.rate = rate
        self.weights = weights
        self.delay_ms = delay_ms
        self.timeout = timeout
        self.upstream_timeout = upstream_timeout
        self.port = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._healed = False
        self._requests = 0
        self._faults: Counter[str] = Counter()
        self._outcomes: Counter[str] = Counter()
        self._paths: Counter[str] = Counter()
        self._clients: Counter[str] = Counter()
        self._in_flight = 0
        self._errors: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._start_error: BaseException | None = None

    # -- control, from any thread ---------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        """Listen on a free loopback port (see :attr:`url`); return self."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="fault-proxy", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault proxy did not start within 10 s")
        if self._start_error is not None:
            self._thread.join(5)
            raise RuntimeError(f"the fault proxy cannot listen: {self._start_error}")
        return self

    def close(self) -> None:
        """Stop listening, close every connection and the event loop."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(loop.stop)
            thread.join(15)
        if thread.is_alive():
            raise RuntimeError("the fault proxy did not stop within 15 s")
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def heal(self) -> None:
        """Pass every request from now on (the hub being down still fails them)."""
        with self._lock:
            self._healed = True

    def disrupt(self, rate: float | None = None) -> None:
        """Inject faults again (at ``rate``, if given)."""
        with self._lock:
            self._healed = False
            if rate is not None:
                self.rate = rate

    @property
    def healed(self) -> bool:
        with self._lock:
            return self._healed

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(
                self._requests,
                dict(self._faults),
                dict(self._outcomes),
                dict(self._paths),
                tuple(self._errors),
            )

    def in_flight(self) -> int:
        """How many requests are with the hub right now (sent, whole answer not yet read)."""
        with self._lock:
            return self._in_flight

    def requests_from(self, token: str) -> int:
        """How many requests carried ``Authorization: Bearer <token>``."""
        with self._lock:
            return self._clients[_client_id(f"Bearer {token}".encode())]

    # -- decisions -------------------------------------------------------------

    def _choose(self) -> str:
        with self._lock:
            if self._healed or self.rate <= 0 or self._rng.random() >= self.rate:
                return "pass"
            kinds = [k for k in FAULTS if self.weights.get(k, 0) > 0]
            return self._rng.choices(kinds, [self.weights[k] for k in kinds])[0]

    def _uniform(self, low: float, high: float) -> float:
        with self._lock:
            return self._rng.uniform(low, high)

    def _randint(self, low: int, high: int) -> int:
        with self._lock:
            return self._rng.randint(low, high)

    def _count(self, *, fault: str | None = None, outcome: str | None = None) -> None:
        with self._lock:
            if fault is not None:
                self._faults[fault] += 1
            if outcome is not None:
                self._outcomes[outcome] += 1

    # -- the event loop thread -------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._on_loop_error)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0, limit=2**16)
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        except OSError as exc:
            self._start_error = exc
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(self._server.wait_closed())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        with self._lock:
            self._errors.append(str(context.get("exception") or context.get("message")))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One office connection: requests one after another, while it keeps alive."""
        fresh = True
        try:
            while True:
                # A fresh connection's fate is drawn when it opens (it may be refused
                # at once); a kept-alive one's when its next request has arrived.
                fate = self._choose() if fresh else ""
                if fate == "refuse":
                    self._count_request(None, "refuse")
                    return
                request = await self._read_request(reader)
                if request is None:
                    return
                if not fresh or self.healed:
                    fate = self._choose()
                fresh = False
                self._count_request(request, fate)
                await self._handle(request, fate, writer)
                if not request.keep_alive:
                    return
        except _Close:
            return
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return
        except Exception as exc:  # a bug of the proxy: keep it for the test to see
            with self._lock:
                self._errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    def _count_request(self, request: _Request | None, fate: str) -> None:
        with self._lock:
            self._requests += 1
            if request is not None:
                self._paths[request.path] += 1
                self._clients[request.client] += 1
            if fate != "pass":
                self._faults[fate] += 1

    async def _read_request(self, reader: asyncio.StreamReader) -> _Request | None:
        """Read one request; None when the office closed or went quiet."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            return None
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            self._count(outcome="unsupported")
            raise _Close
        headers = _headers(lines[1:])
        if b"transfer-encoding" in headers:
            self._count(outcome="unsupported")
            raise _Close
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            self._count(outcome="unsupported")
            raise _Close from None
        body = b""
        if length:
            body = await asyncio.wait_for(reader.readexactly(length), self.timeout)
        keep_alive = parts[2] == b"HTTP/1.1" and headers.get(b"connection", b"").lower() != b"close"
        path = parts[1].split(b"?", 1)[0].decode("latin-1")
        return _Request(
            head, body, path, keep_alive, _client_id(headers.get(b"authorization", b""))
        )

    async def _handle(self, request: _Request, fate: str, writer: asyncio.StreamWriter) -> None:
        if fate == "refuse":
            raise _Close
        if fate == "503":
            await self._send(writer, _response(503, _SERVICE_UNAVAILABLE, request.keep_alive))
            return
        if fate == "delay":
            await asyncio.sleep(self._uniform(*self.delay_ms) / 1000)
        outgoing = _close_after(request.head) + request.body
        if fate == "cut":
            if request.body:
                size = len(outgoing) - len(request.body) + self._randint(0, len(request.body) - 1)
            else:
                size = self._randint(1, len(outgoing) - 1)
            await self._upstream(outgoing[:size], cut=True)
            raise _Close
        answer = await self._upstream(outgoing)
        if answer is None:
            raise _Close
        if fate == "drop":
            raise _Close  # the hub has answered (and committed); the office never hears
        self._count(outcome="answered")
        response, reusable = _for_office(answer, request.keep_alive)
        await self._send(writer, response)
        if not reusable:
            raise _Close

    async def _upstream(self, data: bytes, *, cut: bool = False) -> bytes | None:
        """Send ``data`` to the hub on a new connection; return its whole answer.

        With ``cut`` the connection is closed right after sending (no answer). None
        when the hub cannot be reached or does not answer in full.
        """
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), min(self.timeout, 10)
            )
        except (OSError, TimeoutError):
            self._count(outcome="upstream_down")
            return None
        with self._lock:
            self._in_flight += 1
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self.timeout)
            if cut:
                return None
            answer = await asyncio.wait_for(reader.read(), self.upstream_timeout)
        except (OSError, TimeoutError):
            self._count(outcome="upstream_lost")
            return None
        finally:
            with self._lock:
                self._in_flight -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)
        if not answer.startswith(b"HTTP/1.") or b"\r\n\r\n" not in answer:
            self._count(outcome="upstream_lost")
            return None
        return answer

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.timeout)


def _client_id(authorization: bytes) -> str:
    if not authorization:
        return ""
    return hashlib.sha256(authorization.strip()).hexdigest()[:16]


def _headers(lines: list[bytes]) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return headers


def _close_after(head: bytes) -> bytes:
    """The request head, asking the hub to close the connection after answering."""
    lines = head[:-4].split(b"\r\n")
    kept = [
        line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in _HOP_BY_HOP
    ]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"


def _response(status: int, body: bytes, keep_alive: bool) -> bytes:
    reason = {503: "Service Unavailable"}.get(status, "Error")
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _for_office(answer: bytes, keep_alive: bool) -> tuple[bytes, bool]:
    """The hub's answer as the office gets it, and whether the connection stays open.

    The hub closed its connection after answering; the office's stays open when the
    answer is framed by a Content-Length that matches its body.
    """
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = _headers(lines[1:])
    length = headers.get(b"content-length")
    reusable = (
        keep_alive
        and b"transfer-encoding" not in headers
        and length is not None
        and length.isdigit()
        and int(length) == len(body)
    )
    kept = [
        line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in _HOP_BY_HOP
    ]
    connection = b"Connection: keep-alive" if reusable else b"Connection: close"
    return b"\r\n".join([lines[0], *kept, connection]) + b"\r\n\r\n" + body, reusable
