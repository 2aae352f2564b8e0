"""Stop serving a request whose client has gone: an ASGI middleware that cancels the handler.

Starlette and BentoML never cancel a handler when its client disconnects: the request runs to its end
and its answer is thrown away. For a segmentation request that means its row keeps a slot of the
engine's running batch for hundreds of decode steps. This middleware listens for the server's
`http.disconnect` once the request body has been read, and cancels the handler when it comes first.
On the public service that closes the call to the engine; on the engine it cancels the request's
future, and the scheduler frees its slot (segmentation/model/graph/scheduler.py).
"""

from __future__ import annotations

import asyncio
import contextlib


class CancelOnDisconnect:
    """ASGI middleware: cancel the handler of `paths` (all HTTP paths if None) when the client leaves."""

    def __init__(self, app, *, paths: frozenset[str] | None = None) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (self.paths is not None and scope.get("path") not in self.paths):
            return await self.app(scope, receive, send)
        body_read = asyncio.Event()
        left = asyncio.Event()

        async def receive_body():
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_read.set()
            return message

        handler = asyncio.ensure_future(self.app(scope, receive_body, send))

        async def watch() -> None:
            await body_read.wait()
            # After the body only the end of the connection can come (or, once the answer is sent,
            # the server's own end-of-request message, when the handler is done anyway).
            if (await receive())["type"] == "http.disconnect" and not handler.done():
                left.set()
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not left.is_set():
                raise  # cancelled from outside: not ours to swallow
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
