"""Live membership: DNS discovery against a real DNS server, the instance file, the pool.

A dnslib server on 127.0.0.1 answers for `comfy.test`; emulators listen on 127.0.0.2-.4
(one port, as the pods behind a headless Service). Tests change the records or the file,
call `Membership.refresh()` (or let `run()` do it), and wait on the pool's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from consumer.comfy import ComfyClient, InstancePool, PromptRun
from consumer.comfy.membership import InstancesFile, Membership, expand, parse_entries
from consumer.comfy.resolver import DnsResolver
from consumer.errors import DiscoveryFailed, InstanceUnavailable
from consumer.metrics import InstanceGauge, MembershipFigures, Metrics
from consumer.settings import (
    ComfyInstanceSettings,
    SettingsError,
    load_settings,
    nameserver_address,
)
from consumer.testing.comfyui_emulator import ComfyEmulator, Faults
from tests.comfy.fleet import Records, emulators_on, loopback_dns
from tests.comfy.helpers import fast_pool, first_checkpoint, png_bytes, sampler_prompt

pytestmark = pytest.mark.emulator_only

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
NAME = "comfy.test"
WAIT_S = 10.0


def discover(port: int, name: str = "", capacity: int = 2) -> ComfyInstanceSettings:
    return ComfyInstanceSettings(
        url=f"http://{NAME}:{port}", name=name, max_concurrency=capacity, discover=True
    )


@pytest.fixture
def dns() -> Iterator[tuple[Records, str]]:
    with loopback_dns() as server:
        yield server


@contextlib.asynccontextmanager
async def running(pool: InstancePool) -> AsyncIterator[InstancePool]:
    """The pool entered and run, as app.Service does."""
    async with pool:
        task = asyncio.create_task(pool.run())
        try:
            yield pool
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def until(pool: InstancePool, predicate: Callable[[], bool]) -> None:
    """Wait on the pool's membership and capacity events until `predicate` holds."""
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            waits = [
                asyncio.ensure_future(event.wait())
                for event in (pool.membership_event, pool.capacity_event)
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()


def names(pool: InstancePool) -> set[str]:
    return {i.name for i in pool.instances}


def serving(pool: InstancePool) -> set[str]:
    return {i.name for i in pool.instances if i.serving}


# -- parsing and naming ---------------------------------------------------------------------


def test_expand_names_each_address_and_brackets_ipv6() -> None:
    """One instance per address: `<name or host>/<ip>:<port>`, its URL on the address."""
    entry = ComfyInstanceSettings(
        url="http://user:pw@gpu.svc:8188/base", max_concurrency=3, discover=True
    )
    v4, v6 = expand(entry, ["10.0.0.5", "fd00::7"])
    assert (v4.name, v4.url, v4.max_concurrency) == (
        "gpu.svc/10.0.0.5:8188",
        "http://user:pw@10.0.0.5:8188/base",
        3,
    )
    assert (v6.name, v6.url) == ("gpu.svc/[fd00::7]:8188", "http://user:pw@[fd00::7]:8188/base")
    assert not v4.discover
    named = ComfyInstanceSettings(url="https://gpu.svc", name="gpu", discover=True)
    assert [i.name for i in expand(named, ["10.0.0.5"])] == ["gpu/10.0.0.5:443"]


def test_parse_entries_reads_urls_and_objects_with_a_default_concurrency() -> None:
    """The COMFYUI_INSTANCES format, in YAML or JSON; max_concurrency defaults as given."""
    yaml_text = b"- http://a:8188\n- {url: 'http://gpu:8188', discover: true, max_concurrency: 4}\n"
    a, gpu = parse_entries(yaml_text, max_concurrency=3)
    assert (a.url, a.max_concurrency, a.discover) == ("http://a:8188", 3, False)
    assert (gpu.max_concurrency, gpu.discover) == (4, True)
    as_json = json.dumps(["http://a:8188"]).encode()
    assert parse_entries(as_json, yaml_text=False) == [
        ComfyInstanceSettings(url="http://a:8188", max_concurrency=2)
    ]


@pytest.mark.parametrize(
    "text",
    [b"", b"{url: http://a:8188}", b"- ftp://a", b"- {url: http://a, colour: red}", b"[unclosed"],
)
def test_parse_entries_refuses_what_is_not_a_list_of_instances(text: bytes) -> None:
    """Empty, a mapping, a bad URL, an unknown key, broken syntax: ValueError."""
    with pytest.raises(ValueError, match=r"."):
        parse_entries(text)


def test_settings_read_discover_entries_nameservers_and_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """COMFYUI_INSTANCES takes `discover`; nameservers are `ip[:port]`; a file alone lists none."""
    monkeypatch.setenv(
        "COMFYUI_INSTANCES", '[{"url": "http://gpu.svc:8188", "discover": true}, "http://a:1"]'
    )
    monkeypatch.setenv("COMFYUI_DNS_NAMESERVERS", "127.0.0.1:5353, ::1, [fd00::53]:53")
    settings = load_settings()
    assert [i.discover for i in settings.instances()] == [True, False]
    assert [nameserver_address(n) for n in settings.comfyui_dns_nameservers] == [
        ("127.0.0.1", 5353),
        ("::1", 53),
        ("fd00::53", 53),
    ]
    monkeypatch.delenv("COMFYUI_INSTANCES")
    assert load_settings(comfyui_instances_file=tmp_path / "i.yaml").instances() == []
    with pytest.raises(SettingsError, match="COMFYUI_DNS_NAMESERVERS"):
        load_settings(comfyui_dns_nameservers=["dns.example:53"])


# -- the instance file ------------------------------------------------------------------------


async def test_instances_file_follows_writes_and_keeps_its_last_good_list(tmp_path: Path) -> None:
    """Written, changed, broken (kept, not ok), removed (kept, not ok), fixed again."""
    path = tmp_path / "instances.json"
    source = InstancesFile(path, max_concurrency=3)
    assert await source.read() == []
    assert not source.ok
    path.write_text(json.dumps(["http://a:8188"]))
    assert [e.url for e in await source.read()] == ["http://a:8188"]
    assert source.ok
    path.write_text(json.dumps(["http://a:8188", {"url": "http://b:8188", "max_concurrency": 1}]))
    entries = await source.read()
    assert [(e.url, e.max_concurrency) for e in entries] == [
        ("http://a:8188", 3),
        ("http://b:8188", 1),
    ]
    path.write_text('["http://a:8188", ')  # half written
    assert await source.read() == entries
    assert not source.ok
    path.unlink()
    assert await source.read() == entries
    assert not source.ok
    path.write_text("[]")
    assert await source.read() == []
    assert source.ok


async def test_instances_file_in_yaml(tmp_path: Path) -> None:
    """Any other suffix is read as YAML (a ConfigMap's usual format)."""
    path = tmp_path / "instances.yaml"
    path.write_text("- url: http://a:8188\n  name: a\n")
    assert [e.name for e in await InstancesFile(path).read()] == ["a"]


# -- the resolver -----------------------------------------------------------------------------


async def test_resolver_answers_a_and_aaaa_records(dns: tuple[Records, str]) -> None:
    """Both families, sorted; an IP literal needs no look-up; no such name: no address."""
    records, nameserver = dns
    records.set(NAME, ["127.0.0.3", "fd00::1", "127.0.0.2"])
    resolver = DnsResolver([nameserver], timeout_s=2.0)
    assert await resolver.addresses(NAME) == ["127.0.0.2", "127.0.0.3", "fd00::1"]
    assert await resolver.addresses("127.0.0.9") == ["127.0.0.9"]
    assert await resolver.addresses("missing.test") == []


async def test_resolver_failure_is_discovery_failed(dns: tuple[Records, str]) -> None:
    """A SERVFAIL is no answer: DiscoveryFailed, not an empty list."""
    records, nameserver = dns
    records.set(NAME, ["127.0.0.2"])
    records.fail()
    with pytest.raises(DiscoveryFailed, match="SERVFAIL"):
        await DnsResolver([nameserver], timeout_s=2.0).addresses(NAME)


# -- membership without a pool ----------------------------------------------------------------


class Desired:
    """A target that remembers the last desired list."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def reconcile(self, desired: Sequence[ComfyInstanceSettings]) -> None:
        self.names = [i.label for i in desired]


async def test_membership_keeps_the_last_answer_when_dns_fails(dns: tuple[Records, str]) -> None:
    """SERVFAIL keeps the addresses (source not ok); NXDOMAIN is an answer: none left."""
    records, nameserver = dns
    target = Desired()
    static = [ComfyInstanceSettings(url="http://fixed:8188"), discover(8188)]
    membership = Membership(target, static, resolver=DnsResolver([nameserver], timeout_s=2.0))
    records.set(NAME, ["127.0.0.2", "127.0.0.3"])
    await membership.refresh()
    expected = ["fixed:8188", f"{NAME}/127.0.0.2:8188", f"{NAME}/127.0.0.3:8188"]
    assert target.names == expected
    assert membership.sources_ok() == {"dns": True}
    records.fail()
    await membership.refresh()
    assert target.names == expected
    assert membership.sources_ok() == {"dns": False}
    records.fail(failing=False)
    records.remove(NAME)
    await membership.refresh()
    assert target.names == ["fixed:8188"]
    assert membership.sources_ok() == {"dns": True}


async def test_membership_expands_discover_entries_of_the_file(
    dns: tuple[Records, str], tmp_path: Path
) -> None:
    """The file may list `discover` entries too; its state is reported as the `file` source."""
    records, nameserver = dns
    records.set(NAME, ["127.0.0.4"])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps([{"url": f"http://{NAME}:1234", "name": "gpu", "discover": True}]))
    target = Desired()
    membership = Membership(
        target, [], resolver=DnsResolver([nameserver]), file=InstancesFile(path)
    )
    await membership.refresh()
    assert target.names == ["gpu/127.0.0.4:1234"]
    assert membership.sources_ok() == {"file": True, "dns": True}


# -- the pool follows ------------------------------------------------------------------------


async def test_pool_follows_the_dns_records(dns: tuple[Records, str], tmp_path: Path) -> None:
    """Addresses added join once probed; addresses removed leave; stats follow."""
    records, nameserver = dns
    async with emulators_on(HOSTS, tmp_path) as (_, port), running(fast_pool([])) as pool:
        membership = Membership(pool, [discover(port)], resolver=DnsResolver([nameserver]))
        first, second, third = (f"{NAME}/{host}:{port}" for host in HOSTS)
        records.set(NAME, HOSTS[:2])
        await membership.refresh()
        assert names(pool) == {first, second}
        await until(pool, lambda: serving(pool) == {first, second})
        assert pool.healthy_capacity() == 4
        records.set(NAME, HOSTS[1:])
        await membership.refresh()
        await until(pool, lambda: names(pool) == {second, third} and len(serving(pool)) == 2)
        assert {s.name for s in pool.stats()} == {second, third}
        assert pool.membership_changes == {"added": 3, "removed": 1}
        assert pool.find(third) is not None
        assert pool.find(first) is None


async def test_membership_run_re_resolves_every_interval(
    dns: tuple[Records, str], tmp_path: Path
) -> None:
    """The loop itself: a record added while it runs joins within an interval or two."""
    records, nameserver = dns
    async with emulators_on(HOSTS[:2], tmp_path) as (_, port), running(fast_pool([])) as pool:
        records.set(NAME, HOSTS[:1])
        membership = Membership(
            pool, [discover(port)], resolver=DnsResolver([nameserver]), interval_s=0.05
        )
        loop = asyncio.create_task(membership.run())
        try:
            await until(pool, lambda: len(serving(pool)) == 1)
            records.set(NAME, HOSTS[:2])
            await until(pool, lambda: len(serving(pool)) == 2)
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)


async def test_an_empty_pool_waits_for_an_instance_instead_of_failing(
    dns: tuple[Records, str], tmp_path: Path
) -> None:
    """No member yet (DNS not answered): a slot request waits, then gets the first one."""
    records, nameserver = dns
    async with emulators_on(HOSTS[:1], tmp_path) as (_, port), running(fast_pool([])) as pool:
        membership = Membership(pool, [discover(port)], resolver=DnsResolver([nameserver]))
        await membership.refresh()
        assert pool.instances == []

        async def hold() -> str:
            async with pool.slot() as instance:
                return instance.name

        waiting = asyncio.create_task(hold())
        records.set(NAME, HOSTS[:1])
        await membership.refresh()
        async with asyncio.timeout(WAIT_S):
            assert await waiting == f"{NAME}/{HOSTS[0]}:{port}"


async def test_a_removed_instance_finishes_its_prompt_then_leaves(
    dns: tuple[Records, str], tmp_path: Path
) -> None:
    """Draining: no new slot on it, the running prompt completes, then it is gone."""
    records, nameserver = dns
    faults = Faults(step_seconds=0.02)
    async with (
        emulators_on(HOSTS[:2], tmp_path, faults) as (_, port),
        running(fast_pool([])) as pool,
    ):
        membership = Membership(pool, [discover(port)], resolver=DnsResolver([nameserver]))
        records.set(NAME, HOSTS[:2])
        await membership.refresh()
        await until(pool, lambda: len(serving(pool)) == 2)
        leaving, staying = (f"{NAME}/{host}:{port}" for host in HOSTS[:2])
        async with pool.slot(exclude={staying}) as instance:
            assert instance.name == leaving
            run = await submit_sampler(instance.client, steps=10)
            records.set(NAME, HOSTS[1:2])
            await membership.refresh()
            assert instance.draining
            assert pool.healthy_capacity() == 2
            assert [s.draining for s in pool.stats() if s.name == leaving] == [True]
            async with pool.slot() as other:
                assert other.name == staying
            assert len(await run.wait()) == 1
        await until(pool, lambda: names(pool) == {staying})


async def test_a_prompt_past_the_drain_grace_is_given_up_and_withdrawn(
    dns: tuple[Records, str], tmp_path: Path
) -> None:
    """Past COMFYUI_DRAIN_GRACE_S: InstanceUnavailable (retried elsewhere), interrupted there."""
    records, nameserver = dns
    faults = Faults(step_seconds=0.05)  # 200 steps: 10 s, far past the grace
    async with (
        emulators_on(HOSTS[:1], tmp_path, faults) as ([emulator], port),
        running(fast_pool([], drain_grace_s=0.2)) as pool,
    ):
        membership = Membership(pool, [discover(port)], resolver=DnsResolver([nameserver]))
        records.set(NAME, HOSTS[:1])
        await membership.refresh()
        await until(pool, lambda: len(serving(pool)) == 1)
        async with idle_queue(emulator) as idle:

            async def run_while_removed() -> None:
                async with pool.slot() as instance:
                    run = await submit_sampler(instance.client, steps=200)
                    await run.wait_started()
                    records.remove(NAME)
                    await membership.refresh()
                    await run.wait()

            with pytest.raises(InstanceUnavailable, match="removed from the pool"):
                await run_while_removed()
            await until(pool, lambda: pool.instances == [])
            async with asyncio.timeout(WAIT_S):
                await idle.wait()
        assert pool.membership_changes == {"added": 1, "removed": 1}


async def test_pool_follows_the_instance_file(tmp_path: Path) -> None:
    """Instances listed in the file join; a broken file changes nothing; `[]` drains all."""
    path = tmp_path / "instances.json"
    async with emulators_on(HOSTS[:2], tmp_path) as (emulators, _), running(fast_pool([])) as pool:
        a, b = ({"url": e.url, "name": n} for e, n in zip(emulators, "ab", strict=True))
        membership = Membership(
            pool, [], resolver=DnsResolver(["127.0.0.1:9"]), file=InstancesFile(path)
        )
        path.write_text(json.dumps([a]))
        await membership.refresh()
        await until(pool, lambda: serving(pool) == {"a"})
        path.write_text(json.dumps([a, b]))
        await membership.refresh()
        await until(pool, lambda: serving(pool) == {"a", "b"})
        path.write_text("[{")
        await membership.refresh()
        assert serving(pool) == {"a", "b"}
        assert membership.sources_ok() == {"file": False}
        path.write_text("[]")
        await membership.refresh()
        await until(pool, lambda: pool.instances == [])


def test_metrics_show_draining_members_changes_and_sources() -> None:
    """The scrape reads draining per instance, membership changes and each source's state."""
    metrics = Metrics(CollectorRegistry())
    metrics.watch_instances(
        lambda: [InstanceGauge("gpu/10.0.0.5:8188", 1, 2, healthy=True, draining=True)]
    )
    metrics.watch_membership(
        lambda: MembershipFigures({"added": 3, "removed": 1}, {"dns": True, "file": False})
    )
    text = generate_latest(metrics.registry).decode()
    assert 'style_consumer_instance_draining{instance="gpu/10.0.0.5:8188"} 1.0' in text
    assert 'style_consumer_instance_membership_changes_total{change="added"} 3.0' in text
    assert 'style_consumer_instance_membership_changes_total{change="removed"} 1.0' in text
    assert 'style_consumer_instance_source_ok{source="dns"} 1.0' in text
    assert 'style_consumer_instance_source_ok{source="file"} 0.0' in text


# -- helpers ---------------------------------------------------------------------------------


async def submit_sampler(client: ComfyClient, steps: int) -> PromptRun:
    image = await client.upload_image(png_bytes(), f"m-{uuid.uuid4().hex[:8]}.png")
    return await client.submit(sampler_prompt(image, await first_checkpoint(client), steps))


@contextlib.asynccontextmanager
async def idle_queue(emulator: ComfyEmulator) -> AsyncIterator[asyncio.Event]:
    """An Event set when the emulator broadcasts an empty queue after a prompt ran."""
    idle = asyncio.Event()

    async def follow(ws: aiohttp.ClientWebSocketResponse) -> None:
        busy = False
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT or message.json()["type"] != "status":
                continue
            remaining = message.json()["data"]["status"]["exec_info"]["queue_remaining"]
            busy = busy or remaining > 0
            if busy and remaining == 0:
                idle.set()

    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{emulator.url}/ws?clientId={uuid.uuid4().hex}") as ws,
    ):
        follower = asyncio.create_task(follow(ws))
        try:
            yield idle
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
