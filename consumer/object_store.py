"""Outputs in an S3-compatible object store (AWS S3, MinIO, R2, OSS, Ceph), through obstore.

Keys are `<prefix><token>/<filename>`, one fresh 128-bit random token per saved file, as in
the local store: a key cannot be derived from a task id or another key. Objects hold the
bytes exactly as ComfyUI produced them, sent in one PUT with their Content-Type. Events
carry a presigned GET URL (SigV4, at most 7 days), or `{public_base_url}/{key}` when the
bucket or a CDN in front of it is public.

Why obstore's blocking API, on threads this store owns: obstore's `*_async` functions
complete their asyncio futures from tokio's threads, and one still inside
`call_soon_threadsafe` while the interpreter finalises aborts the whole process (SIGABRT at
exit, 3 of 20 short runs here, obstore 0.12). The blocking calls touch Python only from our
executor's threads, which the interpreter joins; the tokio threads never hold Python state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, ParamSpec, Self, TypeVar
from urllib.parse import quote, urlsplit

import obstore
from obstore.exceptions import BaseError
from obstore.store import S3Store

from consumer.errors import OutputUploadFailed
from consumer.settings import MAX_PRESIGN_S
from consumer.storage import is_stored_name, safe_filename

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType

    from obstore import ObjectMeta
    from obstore.store import ClientConfig, RetryConfig, S3Config

log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
DEFAULT_REGION = "us-east-1"  # where SigV4 signs when nothing names a region
_STATUS = re.compile(r"\bstatus(?: code)?: (\d{3})\b")
_RETRIES = re.compile(r"\bafter (\d+) retries\b")
_S3_CODE = re.compile(r"<Code>([A-Za-z]{1,64})</Code>")
# obstore raises its BaseError tree, and builtin FileNotFoundError (404) and ValueError.
CLIENT_ERRORS = (BaseError, FileNotFoundError, ValueError)


@dataclass(frozen=True)
class S3OutputConfig:
    """Where and how outputs are stored. Credentials None: the client's own role chain."""

    bucket: str
    region: str = DEFAULT_REGION
    endpoint_url: str | None = None
    prefix: str = ""
    force_path_style: bool = False
    url_expiry_s: int = MAX_PRESIGN_S
    public_base_url: str | None = None
    timeout_s: float = 60.0  # per request, and for all retries of one call together
    connect_timeout_s: float = 5.0
    max_retries: int = 4
    backoff_s: float = 0.2  # first retry's wait, doubling with jitter up to max_backoff_s
    max_backoff_s: float = 5.0
    sweep: bool = True
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)


class S3OutputStore:
    """An OutputStore on one bucket; `async with` owns the threads its calls run on."""

    def __init__(
        self,
        config: S3OutputConfig,
        *,
        max_workers: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._store: S3Store | None = _client(config)
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="s3-outputs")
        self._clock = clock
        self.saved = 0

    def __repr__(self) -> str:
        where = f"s3://{self.config.bucket}/{self.config.prefix}"
        return f"<S3OutputStore {where!r} saved={self.saved}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Wait for calls in progress (each bounded by its timeouts), stop the threads, and
        drop the client, which closes its pooled connections."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._store = None

    @property
    def _s3(self) -> S3Store:
        if self._store is None:  # _call checks first; this is for mypy and the tests
            raise OutputUploadFailed("the output store is closed")
        return self._store

    async def save(self, task_id: str, filename: str, data: bytes, content_type: str) -> str:
        """Store `data` under a fresh token; returns the URL the event carries."""
        del task_id  # keys never derive from task ids: those may be guessable
        key = f"{self.config.prefix}{secrets.token_hex(16)}/{safe_filename(filename)}"
        try:
            url = await self._call(self._put, key, data, content_type)
        except CLIENT_ERRORS as exc:
            raise OutputUploadFailed(f"storing {self._where(key)} failed: {describe(exc)}") from exc
        self.saved += 1
        return url

    async def cleanup(self, older_than_s: float) -> int:
        """Delete our objects last modified more than `older_than_s` ago; how many went.

        Only keys this store writes (`<prefix><token>/<filename>`) are candidates, so other
        objects sharing the bucket or prefix are left alone. A failure is logged, not raised:
        the next sweep tries again.
        """
        if not self.config.sweep:
            return 0
        try:
            return await self._call(self._sweep, self._clock() - older_than_s)
        except CLIENT_ERRORS as exc:
            log.warning("sweeping %s failed: %s", self._where(""), describe(exc))
            return 0

    async def _call(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self._store is None:
            raise OutputUploadFailed("the output store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def _put(self, key: str, data: bytes, content_type: str) -> str:
        attributes = {"Content-Type": content_type}
        obstore.put(self._s3, key, data, attributes=attributes, use_multipart=False)
        return self._url(key)

    def _url(self, key: str) -> str:
        if self.config.public_base_url:
            return f"{self.config.public_base_url}/{quote(key)}"
        expiry = timedelta(seconds=self.config.url_expiry_s)
        return obstore.sign(self._s3, "GET", key, expiry)

    def _sweep(self, cutoff_s: float) -> int:
        removed = 0
        listing = obstore.list(self._s3, self.config.prefix or None, chunk_size=DELETE_BATCH)
        for batch in listing:
            expired = self._expired(batch, cutoff_s)
            if expired:
                obstore.delete(self._s3, expired)
                removed += len(expired)
        return removed

    def _expired(self, batch: Sequence[ObjectMeta], cutoff_s: float) -> list[str]:
        prefix = self.config.prefix
        return [
            meta["path"]
            for meta in batch
            if meta["last_modified"].timestamp() < cutoff_s
            and meta["path"].startswith(prefix)
            and is_stored_name(meta["path"][len(prefix) :])
        ]

    def _where(self, key: str) -> str:
        return f"s3://{self.config.bucket}/{key or self.config.prefix}"


def describe(exc: BaseException) -> str:
    """What went wrong, in words safe to publish: status, S3 error code, retries.

    The client's own message is never echoed: it carries the server's error body, and
    S3's `SignatureDoesNotMatch` body holds the access key id and the string it signed.
    """
    text = str(exc)
    found = [
        f"HTTP {m[1]}" if (m := _STATUS.search(text)) else type(exc).__name__,
        m[1] if (m := _S3_CODE.search(text)) else "",
        f"after {m[1]} retries" if (m := _RETRIES.search(text)) else "",
    ]
    return " ".join(part for part in found if part)


def bucket_endpoint(endpoint_url: str, bucket: str) -> str:
    """`https://host` -> `https://<bucket>.host`: virtual-hosted addressing at a custom endpoint."""
    parts = urlsplit(endpoint_url)
    return parts._replace(netloc=f"{bucket}.{parts.netloc}").geturl().rstrip("/")


def _client(config: S3OutputConfig) -> S3Store:
    """The obstore client (no I/O yet).

    obstore also reads AWS_* variables; what we pass wins, and what we leave unset (the
    credentials, when Settings has none) comes from its chain: web identity, ECS, IMDS.
    """
    return S3Store(
        config.bucket,
        config=_s3_config(config),
        client_options=_client_options(config),
        retry_config=_retry_config(config),
    )


def _s3_config(config: S3OutputConfig) -> S3Config:
    options: S3Config = {
        "region": config.region,
        "virtual_hosted_style_request": not config.force_path_style,
        "skip_signature": False,
    }
    if config.endpoint_url:
        # With virtual-hosted requests obstore takes the endpoint as the bucket's own URL.
        options["endpoint"] = (
            config.endpoint_url
            if config.force_path_style
            else bucket_endpoint(config.endpoint_url, config.bucket)
        )
    options.update(_credentials(config))
    return options


def _credentials(config: S3OutputConfig) -> S3Config:
    if not (config.access_key_id and config.secret_access_key):
        return {}
    found: S3Config = {
        "access_key_id": config.access_key_id,
        "secret_access_key": config.secret_access_key,
    }
    if config.session_token:
        found["session_token"] = config.session_token
    return found


def _client_options(config: S3OutputConfig) -> ClientConfig:
    return {
        "allow_http": _is_http(config.endpoint_url),
        "connect_timeout": timedelta(seconds=config.connect_timeout_s),
        "timeout": timedelta(seconds=config.timeout_s),
    }


def _retry_config(config: S3OutputConfig) -> RetryConfig:
    """5xx (S3's SlowDown is a 503), 429 and connection errors: bounded in count and time."""
    return {
        "max_retries": config.max_retries,
        "retry_timeout": timedelta(seconds=config.timeout_s),
        "backoff": {
            "init_backoff": timedelta(seconds=config.backoff_s),
            "max_backoff": timedelta(seconds=config.max_backoff_s),
            "base": 2,
        },
    }


def _is_http(url: str | None) -> bool:
    return url is not None and urlsplit(url).scheme == "http"
