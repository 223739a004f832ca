"""Where finished images go: a local directory served by the sidecar, or a presigned PUT.

(An S3-compatible bucket is the other `OutputStore`: `consumer/object_store.py`.)

Outputs are stored byte for byte as ComfyUI produced them, never re-encoded.

Local layout: `<root>/<token>/<filename>`, one fresh 128-bit random token per saved file,
so a URL cannot be guessed from a task id or another URL. The sidecar serves
`/outputs/<token>/<filename>` through `LocalOutputStore.resolve()`.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

import aiohttp
from yarl import URL

from consumer.errors import ImageUrlForbidden, OutputUploadFailed
from consumer.fetch import REDIRECT_STATUSES, GuardedClient, display_url

if TYPE_CHECKING:
    from collections.abc import Iterator

MAX_FILENAME_CHARS = 128
UPLOAD_REDIRECTS = frozenset({307, 308})  # see _put
_TOKEN = re.compile(r"[0-9a-f]{32}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class OutputStore(Protocol):
    """Stores output images and returns the URLs they can be fetched from.

    Implementations: `LocalOutputStore` here, `S3OutputStore` in `consumer.object_store`.
    """

    async def save(self, task_id: str, filename: str, data: bytes, content_type: str) -> str: ...

    async def cleanup(self, older_than_s: float) -> int:
        """Delete outputs stored more than `older_than_s` ago; returns how many went."""
        ...


def is_stored_name(rel_path: str) -> bool:
    """Whether `rel_path` is a `<token>/<filename>` that a store's `save()` can produce."""
    token, _, name = rel_path.partition("/")
    return bool(_TOKEN.fullmatch(token) and _SAFE_NAME.fullmatch(name))


def safe_filename(filename: str) -> str:
    """`filename`'s last path part reduced to `[A-Za-z0-9._-]`, no leading dot, <= 128 chars."""
    base = re.split(r"[/\\]", filename)[-1]
    cleaned = _UNSAFE_CHARS.sub("_", base).lstrip(".")[:MAX_FILENAME_CHARS]
    return cleaned or "output"


class LocalOutputStore:
    """Files under `root`, public at `{public_base_url}/outputs/<token>/<filename>`."""

    def __init__(self, root: Path, public_base_url: str) -> None:
        self.root = root
        self.public_base_url = public_base_url.rstrip("/")

    def __repr__(self) -> str:
        return f"<LocalOutputStore root={str(self.root)!r} url={self.public_base_url!r}>"

    async def save(self, task_id: str, filename: str, data: bytes, content_type: str) -> str:
        """Write `data` under a fresh token; the URL names no task (ids may be guessable)."""
        del task_id, content_type  # the token names the file; the sidecar sniffs the type
        token = secrets.token_hex(16)
        name = safe_filename(filename)
        await asyncio.to_thread(self._write, token, name, data)
        return f"{self.public_base_url}/outputs/{token}/{quote(name)}"

    def _write(self, token: str, name: str, data: bytes) -> None:
        directory = self.root / token
        directory.mkdir(parents=True)
        partial = directory / f".{name}.partial"
        partial.write_bytes(data)
        partial.replace(directory / name)

    def resolve(self, rel_path: str) -> Path | None:
        """The file for `<token>/<filename>`, or None: malformed, traversal, or gone.

        Only names `save()` can produce are accepted, so `..`, absolute paths, encoded
        separators and symlink tricks never reach the file system. One `stat` call.
        """
        if not is_stored_name(rel_path):
            return None
        path = self.root / rel_path
        return path if path.is_file() and not path.is_symlink() else None

    async def cleanup(self, older_than_s: float) -> int:
        """Remove outputs saved more than `older_than_s` ago; returns how many files went."""
        return await asyncio.to_thread(self._cleanup, time.time() - older_than_s)

    def _cleanup(self, cutoff_s: float) -> int:
        removed = 0
        for directory in self._token_dirs():
            if directory.stat().st_mtime < cutoff_s:
                removed += sum(1 for child in directory.iterdir() if child.is_file())
                shutil.rmtree(directory, ignore_errors=True)
        return removed

    def _token_dirs(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for child in self.root.iterdir():
            if _TOKEN.fullmatch(child.name) and child.is_dir() and not child.is_symlink():
                yield child


async def upload_presigned(
    client: GuardedClient, url: str, data: bytes, content_type: str, timeout_s: float = 60.0
) -> str:
    """PUT `data` to a presigned URL; returns the URL without its query (the signature).

    The URL comes from a request, so the PUT goes through the fetcher's `GuardedClient`:
    the guard checks it and every redirect hop. `timeout_s` bounds all hops together.
    """
    target = _upload_url(url)
    public = display_url(target)
    try:
        async with asyncio.timeout(timeout_s):
            await _put(client, target, data, content_type)
    except ImageUrlForbidden as exc:
        raise OutputUploadFailed(f"upload refused: {exc.message}") from exc
    except TimeoutError as exc:
        raise OutputUploadFailed(f"PUT {public} did not finish within {timeout_s:g}s") from exc
    return public


def _upload_url(url: str) -> URL:
    try:
        return URL(url)
    except ValueError as exc:
        raise OutputUploadFailed(f"not a valid upload URL: {url[:100]!r}") from exc


async def _put(client: GuardedClient, url: URL, data: bytes, content_type: str) -> None:
    """PUT, re-sent with the same body on 307/308 (the statuses that keep method and body).

    301/302/303 end the upload as a failure: 303 asks for a GET; on a 302 clients disagree
    (requests re-sends a PUT as a body-less GET, aiohttp keeps the PUT), so following it
    is a guess; and S3's 301 (PermanentRedirect, a wrong endpoint) names the endpoint only
    in its body, which SDKs answer by re-signing, impossible for a presigned URL. The
    redirect S3 expects a client to follow with the same request is 307 (TemporaryRedirect).
    """
    async with client.open(
        "PUT",
        url,
        follow=UPLOAD_REDIRECTS,
        failure=OutputUploadFailed,
        data=data,
        headers={"Content-Type": content_type},
    ) as response:
        _check_stored(response)


def _check_stored(response: aiohttp.ClientResponse) -> None:
    """Fail unless the final hop answered 2xx; neither its body nor its reason is echoed."""
    where = f"PUT {display_url(response.url)}"
    if response.status in REDIRECT_STATUSES:
        raise OutputUploadFailed(
            f"{where}: the upload was redirected with status {response.status},"
            " which a presigned URL never does"
        )
    if not 200 <= response.status < 300:  # noqa: PLR2004 - the 2xx range
        raise OutputUploadFailed(f"{where} answered HTTP {response.status}")
