"""LocalOutputStore on a temp directory, and presigned PUTs against a loopback server."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from consumer.errors import OutputUploadFailed
from consumer.fetch import ImageFetcher
from consumer.storage import LocalOutputStore, OutputStore, safe_filename, upload_presigned

from .conftest import SECRET, LoopbackServer

BASE = "https://cdn.example.com/base"
URL_PATTERN = re.compile(r"https://cdn\.example\.com/base/outputs/([0-9a-f]{32})/(.+)")
LOOPBACK = {"127.0.0.1"}


@pytest.fixture
def store(tmp_path: Path) -> LocalOutputStore:
    return LocalOutputStore(tmp_path / "outputs", BASE + "/")


def rel_path(url: str) -> str:
    match = URL_PATTERN.fullmatch(url)
    assert match, url
    return f"{match[1]}/{match[2]}"


async def test_save_writes_bytes_under_an_unguessable_url(store: LocalOutputStore):
    """The file holds the exact bytes, behind a fresh 32-hex token per save."""
    first = await store.save("task-1", "styled_00001_.png", b"\x89PNG first", "image/png")
    second = await store.save("task-1", "styled_00001_.png", b"\x89PNG second", "image/png")
    assert first != second
    assert "task-1" not in first
    path = store.resolve(rel_path(first))
    assert path is not None
    assert path.read_bytes() == b"\x89PNG first"
    assert path.name == "styled_00001_.png"


def test_store_satisfies_the_protocol(store: LocalOutputStore):
    """LocalOutputStore is an OutputStore."""
    implementation: OutputStore = store
    assert implementation is store


@pytest.mark.parametrize(
    ("given", "safe"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("..", "output"),
        ("", "output"),
        (".hidden.png", "hidden.png"),
        ("ünïcode name?.webp", "_n_code_name_.webp"),
        ("a" * 300 + ".png", "a" * 128),
    ],
)
def test_safe_filename(given: str, safe: str):
    """Only the last path part survives, reduced to a safe alphabet and length."""
    assert safe_filename(given) == safe


async def test_saved_name_is_sanitised(store: LocalOutputStore):
    """A hostile filename cannot leave the token directory."""
    url = await store.save("t", "../../../x.png", b"data", "image/png")
    assert url.endswith("/x.png")
    path = store.resolve(rel_path(url))
    assert path is not None
    assert path.parent.parent == store.root


@pytest.mark.parametrize(
    "template",
    [
        "../{name}",
        "{token}/../{token}/{name}",
        "{token}/../../etc/passwd",
        "/etc/passwd",
        "{token}",
        "{token}/",
        "{token}/{name}/extra",
        "{upper}/{name}",
        "{token}/.{name}.partial",
        "{token}/%2e%2e",
        "{token}\\{name}",
        "{token}/missing.png",
        "0123456789abcdef0123456789abcdef/{name}",
    ],
)
async def test_resolve_refuses_anything_save_did_not_make(store: LocalOutputStore, template):
    """Traversal, odd names and missing files all resolve to None."""
    url = await store.save("t", "out.png", b"data", "image/png")
    token, name = rel_path(url).split("/")
    assert store.resolve(template.format(token=token, name=name, upper=token.upper())) is None


async def test_resolve_refuses_symlinks(store: LocalOutputStore, tmp_path: Path):
    """A symlink planted in a token directory is not served."""
    url = await store.save("t", "out.png", b"data", "image/png")
    token, _ = rel_path(url).split("/")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (store.root / token / "link.png").symlink_to(secret)
    assert store.resolve(f"{token}/link.png") is None


async def test_cleanup_removes_only_old_outputs(store: LocalOutputStore):
    """Outputs older than the cut-off go; fresh ones and foreign directories stay."""
    old = store.resolve(rel_path(await store.save("t", "old.png", b"1", "image/png")))
    new = store.resolve(rel_path(await store.save("t", "new.png", b"2", "image/png")))
    assert old is not None
    assert new is not None
    foreign = store.root / "not-a-token"
    foreign.mkdir()
    hour_ago = time.time() - 3600
    for path in (old, old.parent, foreign):
        os.utime(path, (hour_ago, hour_ago))
    assert await store.cleanup(older_than_s=600) == 1
    assert not old.parent.exists()
    assert new.exists()
    assert foreign.exists()


async def test_cleanup_of_a_missing_root_is_a_no_op(tmp_path: Path):
    """Cleaning a store that never saved anything removes nothing."""
    assert await LocalOutputStore(tmp_path / "never", BASE).cleanup(older_than_s=0) == 0


async def upload(url: str, data: bytes = b"x", timeout_s: float = 5.0, **options) -> str:
    """PUT `data` to `url` through a fresh fetcher's guarded client."""
    async with ImageFetcher(**options) as fetcher:
        return await upload_presigned(fetcher.client, url, data, "image/png", timeout_s)


async def test_presigned_put_sends_body_and_returns_url_without_query(server: LoopbackServer):
    """The PUT carries the bytes and content type; the returned URL drops the signature."""
    url = server.url("/upload/200?X-Amz-Signature=abc&X-Amz-Expires=60")
    public = await upload(url, b"\x89PNG out", allowed_hosts=LOOPBACK)
    assert public == server.url("/upload/200")
    [sent] = server.uploads
    assert (sent.body, sent.content_type) == (b"\x89PNG out", "image/png")
    assert "X-Amz-Signature=abc" in sent.query


@pytest.mark.parametrize("status", [403, 500])
async def test_presigned_put_failure_names_only_the_status(server: LoopbackServer, status: int):
    """A 4xx/5xx fails the upload naming the status: no signature, body or reason phrase."""
    url = server.url(f"/secret/{status}?X-Amz-Signature=signature")
    with pytest.raises(OutputUploadFailed) as caught:
        await upload(url, allowed_hosts=LOOPBACK)
    message = caught.value.message
    assert message == f"PUT {server.url(f'/secret/{status}')} answered HTTP {status}"
    assert "signature" not in message
    assert SECRET not in message


async def test_presigned_put_malformed_answer_names_only_the_exception_type(garbled: str):
    """aiohttp's text for a malformed header quotes it; the message keeps only the type."""
    with pytest.raises(OutputUploadFailed, match="failed: Client") as caught:
        await upload(f"{garbled}/u", allowed_hosts=LOOPBACK)
    assert SECRET not in caught.value.message


async def test_presigned_put_connection_failure(unused_port: int):
    """Nobody listening is an upload failure."""
    with pytest.raises(OutputUploadFailed, match="failed: ClientConnectorError"):
        await upload(f"http://127.0.0.1:{unused_port}/u", allowed_hosts=LOOPBACK)


async def test_presigned_put_timeout_is_an_upload_failure(server: LoopbackServer):
    """A bucket that never answers fails the upload at timeout_s."""
    with pytest.raises(OutputUploadFailed, match=r"did not finish within 0\.3s"):
        await upload(server.url("/stall"), timeout_s=0.3, allowed_hosts=LOOPBACK)


async def test_presigned_put_to_private_literal_is_refused_by_the_guard(server: LoopbackServer):
    """An upload URL on a loopback IP literal is refused before connecting."""
    with pytest.raises(OutputUploadFailed, match=r"upload refused.*loopback"):
        await upload(server.url("/upload/200"))
    assert server.paths == []


async def test_presigned_put_through_guarded_session_checks_dns(server: LoopbackServer):
    """A host name resolving to loopback is refused at connect time."""
    with pytest.raises(OutputUploadFailed, match=r"refused.*'localhost' resolves to"):
        await upload(server.url("/upload/200", host="localhost"))
    assert server.paths == []


async def test_presigned_put_rejects_malformed_url():
    """A URL yarl cannot parse is an upload failure, not a crash."""
    with pytest.raises(OutputUploadFailed, match="not a valid upload URL"):
        await upload("http://h:99999/x")
