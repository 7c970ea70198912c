"""Fault injection at the transport seam: fail before sending, or send and lose the answer."""

from __future__ import annotations

from collections.abc import Callable

import httpx


class FlakyTransport(httpx.BaseTransport):
    """Wraps a real transport; ``plan(request_number, request)`` picks each request's fate.

    The plan returns ``"ok"``, ``"refuse"`` (fail before anything is sent) or ``"drop"``
    (the hub receives and commits the request, then the answer is lost).
    """

    def __init__(self, plan: Callable[[int, httpx.Request], str]) -> None:
        self.inner = httpx.HTTPTransport()
        self.plan = plan
        self.count = 0
        self.log: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.count += 1
        fate = self.plan(self.count, request)
        self.log.append((request.url.path, fate))
        if fate == "refuse":
            raise httpx.ConnectError("connection refused (injected)", request=request)
        response = self.inner.handle_request(request)
        if fate == "drop":
            response.read()
            response.close()
            raise httpx.ReadError(
                "connection reset after the hub answered (injected)", request=request
            )
        return response

    def close(self) -> None:
        self.inner.close()
