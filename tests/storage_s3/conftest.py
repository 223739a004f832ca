"""An S3 server on loopback (moto, in a thread of this session), buckets and stores per test.

`FlakyProxy` stands in front of it to answer the first N PUTs with an error, the way S3
throttles (503 SlowDown) or a gateway fails.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from consumer.object_store import S3OutputConfig, S3OutputStore

# The end-to-end test runs a whole replica: it needs the e2e tier's fixtures.
from tests.e2e.conftest import (  # noqa: F401
    channel,
    emulators,
    events,
    make_settings,
    photos,
    settings,
    topology,
)

ACCESS_KEY_ID = "AKIATESTKEY0000SECRET"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
FAST = {"backoff_s": 0.001, "max_backoff_s": 0.005, "timeout_s": 10.0}  # no backoff in tests
HOP_HEADERS = {"host", "transfer-encoding", "content-length", "connection", "keep-alive"}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 on a free loopback port for the session; its threads are joined after."""
    from moto.server import ThreadedMotoServer

    before = set(threading.enumerate())
    server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=10)  # connection handlers end when their clients hang up
        assert not thread.is_alive(), f"{thread.name} outlived the S3 server"


@pytest.fixture
async def bucket(s3_endpoint: str) -> str:
    """A fresh bucket (moto asks no signature to create one)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    async with aiohttp.ClientSession() as http, http.put(f"{s3_endpoint}/{name}") as response:
        assert response.status == 200
    return name


@pytest.fixture
def s3_config(s3_endpoint: str, bucket: str) -> S3OutputConfig:
    """Path-style addressing at the loopback endpoint, static test credentials, no backoff."""
    return S3OutputConfig(
        bucket=bucket,
        endpoint_url=s3_endpoint,
        force_path_style=True,
        access_key_id=ACCESS_KEY_ID,
        secret_access_key=SECRET_ACCESS_KEY,
        **FAST,
    )


@pytest.fixture
async def open_store() -> AsyncIterator[Callable[..., Any]]:
    """Opens stores for the test (config plus overrides) and closes them after it."""
    opened: list[S3OutputStore] = []

    def open_(
        config: S3OutputConfig, *, clock: Callable[[], float] = time.time, **overrides: Any
    ) -> S3OutputStore:
        store = S3OutputStore(replace(config, **overrides), max_workers=2, clock=clock)
        opened.append(store)
        return store

    yield open_
    for store in reversed(opened):
        await store.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("s3-outputs")]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass
class FlakyProxy:
    """Forwards to S3, but answers the first `failures` PUTs with `status` and an S3 error."""

    upstream: str
    failures: int = 0
    status: int = 503
    code: str = "SlowDown"
    url: str = ""
    puts: int = 0
    bodies: list[bytes] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "PUT":
            self.puts += 1
            self.bodies.append(body)
            if self.failures > 0:
                self.failures -= 1
                return web.Response(status=self.status, body=self._error_body(request))
        return await self._forward(request, body)

    def _error_body(self, request: web.Request) -> bytes:
        """Like S3's: the signature the client sent and the access key echoed back."""
        authorization = request.headers.get("Authorization", "")
        return (
            f"<Error><Code>{self.code}</Code><AWSAccessKeyId>{ACCESS_KEY_ID}</AWSAccessKeyId>"
            f"<SignatureProvided>{authorization}</SignatureProvided></Error>"
        ).encode()

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers
            ) as answer,
        ):
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
            return web.Response(status=answer.status, body=await answer.read(), headers=kept)


@pytest.fixture
async def flaky(s3_endpoint: str) -> AsyncIterator[FlakyProxy]:
    """A FlakyProxy on a free loopback port (no failures until the test sets some)."""
    proxy = FlakyProxy(s3_endpoint)
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    proxy.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield proxy
    await runner.cleanup()
