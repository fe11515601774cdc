"""A local aiohttp server for the image tests and the benchmark: images, errors, slow bodies, redirects, files.

``LocalServer(routes)`` runs an aiohttp app on 127.0.0.1 (random port) in a background thread; ``url(path)``
builds URLs; ``hits`` counts requests per path and ``ranges`` records Range headers (resume tests).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from pathlib import Path

from aiohttp import web


class LocalServer:
    def __init__(self, images: dict[str, bytes] | None = None, files: Path | None = None, latency_s: float = 0.0):
        self.images = images or {}
        self.files = files
        self.latency_s = latency_s
        self.hits: Counter = Counter()
        self.ranges: list[str] = []
        self.fail_first: dict[str, int] = {}  # path -> how many 500s before success
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def __enter__(self) -> "LocalServer":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/img/{name}", self._image)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/retry-after", self._retry_after)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/big", self._big)
        app.router.add_get("/stream-big", self._stream_big)
        app.router.add_get("/files/{name}", self._file)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _image(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.hits[name] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.fail_first.get(name, 0) >= self.hits[name]:
            return web.Response(status=500)
        if name not in self.images:
            return web.Response(status=404)
        return web.Response(body=self.images[name], content_type="image/jpeg")

    async def _status(self, request: web.Request) -> web.Response:
        self.hits[f"status/{request.match_info['code']}"] += 1
        return web.Response(status=int(request.match_info["code"]))

    async def _retry_after(self, request: web.Request) -> web.Response:
        self.hits["retry-after"] += 1
        if self.hits["retry-after"] == 1:
            return web.Response(status=429, headers={"Retry-After": "0"})
        return web.Response(body=next(iter(self.images.values())))

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        await response.write(b"\xff\xd8")
        await asyncio.sleep(1.5)
        return response

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def _big(self, request: web.Request) -> web.Response:
        return web.Response(body=b"\0" * 5000)

    async def _stream_big(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(10):
            await response.write(b"\0" * 1000)
        return response

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits[f"files/{name}"] += 1
        if "Range" in request.headers:
            self.ranges.append(request.headers["Range"])
        path = self.files / name if self.files else None
        if path is None or not path.exists():
            return web.Response(status=404)
        return web.FileResponse(path)
