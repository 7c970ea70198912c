"""An in-process hub for fast tests: a synchronous httpx transport over the ASGI app.

Starlette's TestClient moves to another HTTP package; this keeps tests on httpx, the
client fieldsync itself uses, with the real app, body encoding and error handlers.
"""

from __future__ import annotations

import asyncio

import httpx
from starlette.types import ASGIApp


class ASGIBridge(httpx.BaseTransport):
    """Serve each request by calling the ASGI app on a private event loop."""

    def __init__(self, app: ASGIApp) -> None:
        self._inner = httpx.ASGITransport(app=app)
        self._loop = asyncio.new_event_loop()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> httpx.Response:
            response = await self._inner.handle_async_request(request)
            body = b"".join([chunk async for chunk in response.aiter_raw()])
            return httpx.Response(
                response.status_code, headers=response.headers, content=body, request=request
            )

        return self._loop.run_until_complete(call())

    def close(self) -> None:
        self._loop.close()


def client(app: ASGIApp) -> httpx.Client:
    """An httpx client whose requests go straight to ``app`` (base URL http://testserver)."""
    return httpx.Client(transport=ASGIBridge(app), base_url="http://testserver")
