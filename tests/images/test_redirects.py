"""Redirects of downloads and presigned uploads: followed by hand, every hop guarded.

`public` (127.0.0.2, allowlisted) redirects; `server` (127.0.0.1) and `server_v6` ([::1])
are internal services that must never receive a request.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from consumer.errors import ImageDownloadFailed, ImageUrlForbidden, OutputUploadFailed
from consumer.fetch import ImageFetcher
from consumer.storage import upload_presigned

from .conftest import PUBLIC_HOST, SECRET, LoopbackServer

ALLOWED = {PUBLIC_HOST}
BODY = b"\x89PNG the styled result"

Target = Callable[[LoopbackServer, LoopbackServer], str]
INTERNAL_TARGETS: dict[str, tuple[Target, str]] = {
    "ipv4-loopback": (lambda v4, _: v4.url("/upload/200"), "'127.0.0.1' is a loopback"),
    "ipv6-loopback": (lambda _, v6: v6.url("/upload/200"), "'::1' is a loopback"),
    "localhost": (lambda v4, _: v4.url("/upload/200", "localhost"), "'localhost' resolves to"),
    "decimal-ipv4": (
        lambda v4, _: f"http://2130706433:{v4.port}/upload/200",
        "non-canonical numeric",
    ),
}


@pytest.fixture(params=sorted(INTERNAL_TARGETS))
def internal_target(
    request: pytest.FixtureRequest, server: LoopbackServer, server_v6: LoopbackServer
) -> tuple[str, str]:
    """(URL of an internal service, the guard's reason to refuse it)."""
    target, reason = INTERNAL_TARGETS[request.param]
    return target(server, server_v6), reason


def never_reached(*internal: LoopbackServer) -> bool:
    return all(service.paths == [] for service in internal)


async def upload(url: str, *, timeout_s: float = 5.0, max_redirects: int = 3) -> str:
    async with ImageFetcher(allowed_hosts=ALLOWED, max_redirects=max_redirects) as fetcher:
        return await upload_presigned(fetcher.client, url, BODY, "image/png", timeout_s)


async def fetch(url: str, *, max_redirects: int = 3) -> bytes:
    async with ImageFetcher(allowed_hosts=ALLOWED, max_redirects=max_redirects) as fetcher:
        return await fetcher.fetch(url)


def hop(public: LoopbackServer, status: int, to: str) -> str:
    return public.url(f"/hop/{status}?{'to=' + to if to else ''}")


@pytest.mark.parametrize("status", [307, 308])
async def test_upload_redirect_to_internal_target_is_refused(
    public: LoopbackServer,
    server: LoopbackServer,
    server_v6: LoopbackServer,
    internal_target: tuple[str, str],
    status: int,
):
    """A 307/308 to loopback (literal, IPv6, name, decimal) is refused; nothing is sent."""
    target, reason = internal_target
    with pytest.raises(OutputUploadFailed, match="the redirect target was refused") as caught:
        await upload(hop(public, status, target))
    assert reason in caught.value.message
    assert never_reached(server, server_v6)


@pytest.mark.parametrize("status", [301, 302, 303])
async def test_upload_redirect_that_would_change_the_method_is_not_followed(
    public: LoopbackServer,
    server: LoopbackServer,
    server_v6: LoopbackServer,
    internal_target: tuple[str, str],
    status: int,
):
    """301/302/303 on a PUT fail the upload, wherever they point; nothing is sent there."""
    target, _ = internal_target
    with pytest.raises(OutputUploadFailed) as caught:
        await upload(hop(public, status, target))
    assert caught.value.message == (
        f"PUT {public.url(f'/hop/{status}')}: the upload was redirected with status {status},"
        " which a presigned URL never does"
    )
    assert never_reached(server, server_v6)


@pytest.mark.parametrize("status", [302, 303])
async def test_upload_redirect_302_303_to_an_allowed_host_is_not_followed(
    public: LoopbackServer, status: int
):
    """Even to an allowed host, a method-changing redirect is not followed."""
    with pytest.raises(OutputUploadFailed, match=f"redirected with status {status}"):
        await upload(hop(public, status, public.url("/upload/200")))
    assert public.uploads == []


@pytest.mark.parametrize("status", [307, 308])
async def test_upload_redirect_chain_within_the_limit_delivers_the_body(
    public: LoopbackServer, status: int
):
    """Three 307/308 hops with max_redirects=3: every hop is a PUT, the body arrives intact."""
    url = public.url(f"/chain/{status}/2?X-Amz-Signature=sig")
    assert await upload(url, max_redirects=3) == public.url(f"/chain/{status}/2")
    assert public.paths == [f"/chain/{status}/{n}" for n in (2, 1, 0)] + ["/upload/200"]
    assert set(public.methods) == {"PUT"}
    [stored] = public.uploads
    assert (stored.body, stored.content_type) == (BODY, "image/png")


async def test_upload_with_too_many_redirects_fails(public: LoopbackServer):
    """A fourth redirect with max_redirects=3 fails the upload before the last hop."""
    with pytest.raises(OutputUploadFailed, match="more than 3 redirects"):
        await upload(public.url("/chain/307/3"), max_redirects=3)
    assert public.uploads == []


async def test_upload_deadline_covers_every_hop(public: LoopbackServer):
    """timeout_s bounds the whole upload, redirects included."""
    with pytest.raises(OutputUploadFailed, match=r"did not finish within 0\.3s"):
        await upload(hop(public, 307, "/stall"), timeout_s=0.3)
    assert public.paths == ["/hop/307", "/stall"]


@pytest.mark.parametrize(
    ("to", "complaint"),
    [("", "without a Location"), (f"http://[{SECRET}", "with an invalid Location")],
)
async def test_upload_bad_location_is_not_echoed(public: LoopbackServer, to: str, complaint: str):
    """A missing or unparseable Location fails the upload without quoting the header."""
    with pytest.raises(OutputUploadFailed, match=complaint) as caught:
        await upload(hop(public, 307, to))
    assert SECRET not in caught.value.message


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_download_redirect_to_internal_target_is_refused(
    public: LoopbackServer,
    server: LoopbackServer,
    server_v6: LoopbackServer,
    internal_target: tuple[str, str],
    status: int,
):
    """Every redirect status to loopback (literal, IPv6, name, decimal) is refused unsent."""
    target, reason = internal_target
    with pytest.raises(ImageUrlForbidden, match="the redirect target was refused") as caught:
        await fetch(hop(public, status, target))
    assert reason in caught.value.message
    assert never_reached(server, server_v6)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_download_follows_each_redirect_status_as_a_get(public: LoopbackServer, status: int):
    """A download follows every redirect status within the limit, always with GET."""
    assert await fetch(public.url(f"/chain/{status}/2"), max_redirects=3) == public.body
    assert set(public.methods) == {"GET"}


@pytest.mark.parametrize(
    ("to", "complaint"),
    [("", "without a Location"), (f"http://[{SECRET}", "with an invalid Location")],
)
async def test_download_bad_location_is_not_echoed(public: LoopbackServer, to: str, complaint: str):
    """A missing or unparseable Location fails the download without quoting the header."""
    with pytest.raises(ImageDownloadFailed, match=complaint) as caught:
        await fetch(hop(public, 302, to))
    assert SECRET not in caught.value.message
