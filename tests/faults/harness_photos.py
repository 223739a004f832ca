"""A tiny photo host for the fault suite: a 64x64 JPEG (cheap to fetch and normalise) plus
whatever extra files a scenario adds (`host.files[name] = bytes`) before it publishes."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web
from PIL import Image

PHOTO_SIDE = 64


def tiny_jpeg(side: int = PHOTO_SIDE) -> bytes:
    """A small gradient photo."""
    image = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return out.getvalue()


@dataclass
class PhotoHost:
    """Serves `files` at `/<name>`; counts requests per name."""

    base_url: str = ""
    files: dict[str, bytes] = field(default_factory=lambda: {"photo.jpg": tiny_jpeg()})
    hits: dict[str, int] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name.lstrip('/')}"

    async def serve(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.hits[name] = self.hits.get(name, 0) + 1
        if name not in self.files:
            raise web.HTTPNotFound
        return web.Response(body=self.files[name], content_type="image/jpeg")


@asynccontextmanager
async def photo_host(host: PhotoHost | None = None) -> AsyncIterator[PhotoHost]:
    """`host` listening on 127.0.0.1 (a free port) until the block ends."""
    host = host or PhotoHost()
    app = web.Application()
    app.router.add_get("/{name:.+}", host.serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield host
    finally:
        await runner.cleanup()
