"""HTTP to one ComfyUI instance, with transport failures mapped to `InstanceUnavailable`.

Every request runs under the session's per-phase timeouts (connect, total). A connection
error, a timeout or a 5xx means "this instance cannot serve now": `InstanceUnavailable`,
which the caller may retry elsewhere. 4xx answers are returned for the caller to judge.

Redirects are never followed: instances are configured by the operator, and a 3xx from
one is an unexpected answer like a 4xx, not a pointer to some other host.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson

from consumer.errors import InstanceUnavailable

_SERVER_ERROR = 500
_OK_RANGE = range(200, 300)


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """Per-phase limits of a `ComfyClient` (seconds)."""

    connect_s: float = 5.0
    request_s: float = 30.0
    ws_reconnect_max_s: float = 10.0  # cap of the reconnect backoff
    history_wait_s: float = 10.0  # how long a finished prompt may take to show up in /history
    outage_grace_s: float = 30.0  # socket down this long: outstanding prompts fail as retriable
    ws_heartbeat_s: float = 15.0  # ping period; a missing pong closes the socket

    def client_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.request_s, connect=self.connect_s)


@dataclass(frozen=True, slots=True)
class Answer:
    """A non-5xx HTTP answer."""

    status: int
    body: bytes
    content_type: str

    @property
    def ok(self) -> bool:
        """2xx only: a redirect (not followed) is as unexpected as a 4xx."""
        return self.status in _OK_RANGE

    def json(self) -> Any:
        """The body as JSON; an empty or non-JSON body is `None`."""
        try:
            return orjson.loads(self.body) if self.body else None
        except orjson.JSONDecodeError:
            return None


class ComfyHttp:
    """Requests against one base URL over a shared session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self.base_url = base_url

    async def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        """Send one request; raise `InstanceUnavailable` on transport failure or 5xx."""
        url = f"{self.base_url}{path}"
        try:
            async with self._session.request(
                method, url, allow_redirects=False, **kwargs
            ) as response:
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise InstanceUnavailable(
                f"{method} {url} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status >= _SERVER_ERROR:
            text = body[:200].decode(errors="replace")
            raise InstanceUnavailable(f"{method} {url} answered {response.status}: {text!r}")
        return Answer(response.status, body, response.content_type)

    async def get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET a JSON document that must answer 2xx."""
        answer = await self.request("GET", path, params=params)
        if not answer.ok:
            raise InstanceUnavailable(f"GET {self.base_url}{path} answered {answer.status}")
        return answer.json()

    async def post_json(self, path: str, body: object) -> Answer:
        data = orjson.dumps(body)
        headers = {"Content-Type": "application/json"}
        return await self.request("POST", path, data=data, headers=headers)


def refuse_redirects() -> aiohttp.TraceConfig:
    """A session hook that fails any request aiohttp is about to redirect.

    `ComfyHttp` sends `allow_redirects=False`, but `ws_connect` takes no such option: its
    handshake would follow a 3xx wherever the Location points. This stops it first.
    """
    config = aiohttp.TraceConfig()
    config.on_request_redirect.append(_refuse_redirect)
    return config


async def _refuse_redirect(
    _session: aiohttp.ClientSession,
    _context: SimpleNamespace,
    params: aiohttp.TraceRequestRedirectParams,
) -> None:
    response = params.response
    response.close()
    raise aiohttp.TooManyRedirects(
        response.request_info, (response,), status=response.status, message="not followed"
    )
