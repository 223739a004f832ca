"""The pool's members without the network: the diff (`plan`), and `Roster` with fakes.

The fake client records being opened, closed, abandoned and asked to withdraw; the fake
host marks an instance healthy when its health loop starts. Slots are taken by setting
`in_flight` and handed back with `released()`, as the pool's dispatch does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Self

from consumer.comfy.instance import Instance
from consumer.comfy.members import Changes, Member, Roster, plan
from consumer.settings import ComfyInstanceSettings

WAIT_S = 5.0


def inst(name: str, port: int = 8188, capacity: int = 2) -> ComfyInstanceSettings:
    return ComfyInstanceSettings(
        url=f"http://{name}.test:{port}", name=name, max_concurrency=capacity
    )


# -- plan ----------------------------------------------------------------------------------


def test_plan_joins_new_names_and_drains_missing_ones() -> None:
    """Listed names not in the pool join; members no longer listed drain."""
    current = {"a": Member(inst("a")), "b": Member(inst("b"))}
    changes = plan(current, [inst("a"), inst("c")])
    assert changes == Changes(join=(inst("c"),), drain=("b",))


def test_plan_leaves_an_unchanged_pool_alone() -> None:
    """The same list again changes nothing, and a draining member is not drained twice."""
    current = {"a": Member(inst("a")), "b": Member(inst("b"), draining=True)}
    assert plan(current, [inst("a")]) == Changes()


def test_plan_restores_a_draining_member_listed_again() -> None:
    """A member listed again before it left comes back as it is."""
    current = {"a": Member(inst("a"), draining=True)}
    assert plan(current, [inst("a")]) == Changes(restore=("a",))


def test_plan_resizes_a_member_in_place() -> None:
    """Another max_concurrency for the same URL is a resize, not a drain and a join."""
    current = {"a": Member(inst("a", capacity=2))}
    assert plan(current, [inst("a", capacity=5)]) == Changes(resize=(("a", 5),))


def test_plan_drains_a_moved_name_and_joins_it_after_it_left() -> None:
    """A name listed at another URL drains first; it joins at the new URL once gone."""
    moved = inst("a", port=9999)
    assert plan({"a": Member(inst("a"))}, [moved]) == Changes(drain=("a",))
    assert plan({"a": Member(inst("a"), draining=True)}, [moved]) == Changes()
    assert plan({}, [moved]) == Changes(join=(moved,))


def test_plan_keeps_the_first_entry_of_a_name() -> None:
    """Two entries with one name: the first one counts, the second is ignored."""
    assert plan({}, [inst("a"), inst("a", port=9999)]) == Changes(join=(inst("a"),))


# -- Roster with fakes -----------------------------------------------------------------


class FakeClient:
    """Stands in for ComfyClient: no network, records what the roster did with it."""

    def __init__(self, settings: ComfyInstanceSettings) -> None:
        self.base_url = settings.url
        self.opened = False
        self.closed = False
        self.abandoned: str | None = None
        self.withdrawn: list[str] = []

    async def __aenter__(self) -> Self:
        self.opened = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.closed = True

    def abandon(self, reason: str) -> list[str]:
        self.abandoned = reason
        return ["prompt-1"]

    async def stop_prompts(self, prompt_ids: list[str]) -> None:
        self.withdrawn.extend(prompt_ids)


class FakeHost:
    """The pool's side: a health loop that finds the instance healthy at once."""

    def __init__(self) -> None:
        self.watching: set[str] = set()
        self.serving_changes = 0

    async def watch(self, instance: Instance) -> None:
        self.watching.add(instance.name)
        instance.healthy = True
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self.watching.discard(instance.name)

    def serving_changed(self) -> None:
        self.serving_changes += 1


def make_roster(host: FakeHost, drain_grace_s: float = 30.0) -> Roster:
    return Roster(
        FakeClient,  # type: ignore[arg-type]
        host=host,
        drain_grace_s=drain_grace_s,
        withdraw_timeout_s=1.0,
    )


@contextlib.asynccontextmanager
async def running(roster: Roster) -> AsyncIterator[Roster]:
    task = asyncio.create_task(roster.run())
    try:
        yield roster
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(roster: Roster, predicate: Callable[[], bool]) -> None:
    """Wait for the roster's changes until `predicate` holds."""
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await roster.event.wait()


async def settled(host: FakeHost, roster: Roster) -> None:
    """Every member's task has reached its health loop."""
    async with asyncio.timeout(WAIT_S):
        while host.watching != {i.name for i in roster.instances}:  # noqa: ASYNC110 - the fake host has no event
            await asyncio.sleep(0)


def named(roster: Roster, name: str) -> Instance:
    return next(i for i in roster.instances if i.name == name)


def client_of(instance: Instance) -> FakeClient:
    client = instance.client
    assert isinstance(client, FakeClient)
    return client


async def test_a_new_member_opens_its_client_and_starts_its_health_loop() -> None:
    """reconcile() with a new name: it joins, its client opens, its health loop runs."""
    host = FakeHost()
    roster = make_roster(host)
    roster.admit(inst("a"))
    async with running(roster):
        roster.reconcile([inst("a"), inst("b")])
        await settled(host, roster)
        assert [i.name for i in roster.instances] == ["a", "b"]
        assert client_of(named(roster, "b")).opened
        assert roster.changes == {"added": 1}


async def test_a_reconcile_before_run_is_applied_when_it_starts() -> None:
    """The desired list given before run() takes effect as soon as it runs."""
    host = FakeHost()
    roster = make_roster(host)
    roster.reconcile([inst("a")])
    assert roster.instances == []
    async with running(roster):
        await until(roster, lambda: len(roster.instances) == 1)
        await settled(host, roster)


async def test_an_idle_member_leaves_at_once() -> None:
    """Removed with no slot in use: its health loop stops and its client closes."""
    host = FakeHost()
    roster = make_roster(host)
    a, b = roster.admit(inst("a")), roster.admit(inst("b"))
    async with running(roster):
        await settled(host, roster)
        roster.reconcile([inst("a")])
        await until(roster, lambda: b not in roster.instances)
        assert client_of(b).closed
        assert not client_of(a).closed
        assert host.watching == {"a"}
        assert roster.changes == {"removed": 1}


async def test_a_busy_member_drains_and_leaves_when_its_last_slot_is_released() -> None:
    """Removed while in use: draining (not serving) until its slot comes back, then gone."""
    host = FakeHost()
    roster = make_roster(host)
    b = roster.admit(inst("b"))
    async with running(roster):
        await settled(host, roster)
        b.in_flight = 1
        roster.reconcile([])
        await until(roster, lambda: b.draining)
        assert not b.serving
        assert host.serving_changes == 1
        assert b in roster.instances
        b.in_flight = 0
        roster.released(b)
        await until(roster, lambda: b not in roster.instances)
        assert client_of(b).abandoned is None


async def test_prompts_still_running_after_the_grace_are_given_up() -> None:
    """Past drain_grace_s its prompts are abandoned and withdrawn; it leaves once released."""
    host = FakeHost()
    roster = make_roster(host, drain_grace_s=0.05)
    b = roster.admit(inst("b"))
    async with running(roster):
        await settled(host, roster)
        b.in_flight = 1
        roster.reconcile([])
        client = client_of(b)
        await until(roster, lambda: bool(client.withdrawn))
        assert client.abandoned is not None
        assert "COMFYUI_DRAIN_GRACE_S=0.05s" in client.abandoned
        assert client.withdrawn == ["prompt-1"]
        assert b.given_up
        b.in_flight = 0
        roster.released(b)
        await until(roster, lambda: b not in roster.instances)


async def test_a_member_listed_again_before_it_left_is_restored() -> None:
    """Drained and listed again while busy: the same instance serves again."""
    host = FakeHost()
    roster = make_roster(host)
    b = roster.admit(inst("b"))
    async with running(roster):
        await settled(host, roster)
        b.in_flight = 1
        roster.reconcile([])
        await until(roster, lambda: b.draining)
        roster.reconcile([inst("b")])
        assert not b.draining
        assert b.serving
        b.in_flight = 0
        roster.released(b)
        assert roster.instances == [b]
        assert roster.changes == {}


async def test_a_member_given_up_joins_anew_when_listed_again() -> None:
    """Its client refuses prompts once given up: it leaves, and a new member joins."""
    host = FakeHost()
    roster = make_roster(host, drain_grace_s=0.0)
    b = roster.admit(inst("b"))
    async with running(roster):
        await settled(host, roster)
        b.in_flight = 1
        roster.reconcile([])
        await until(roster, lambda: b.given_up)
        roster.reconcile([inst("b")])
        assert b.draining
        b.in_flight = 0
        roster.released(b)
        await until(roster, lambda: b not in roster.instances and len(roster.instances) == 1)
        assert roster.instances[0].name == "b"
        assert roster.changes == {"added": 1, "removed": 1}


async def test_a_moved_member_rejoins_at_its_new_url_after_leaving() -> None:
    """The same name at another URL: the old member drains and leaves, then the new joins."""
    host = FakeHost()
    roster = make_roster(host)
    old = roster.admit(inst("a"))
    async with running(roster):
        await settled(host, roster)
        old.in_flight = 1
        roster.reconcile([inst("a", port=9999)])
        await until(roster, lambda: old.draining)
        assert [i.name for i in roster.instances] == ["a"]
        old.in_flight = 0
        roster.released(old)
        await until(roster, lambda: old not in roster.instances and len(roster.instances) == 1)
        assert roster.instances[0].url == "http://a.test:9999"


async def test_a_resize_changes_the_capacity_in_place() -> None:
    """A new max_concurrency applies to the running member and is signalled."""
    host = FakeHost()
    roster = make_roster(host)
    a = roster.admit(inst("a", capacity=2))
    async with running(roster):
        await settled(host, roster)
        roster.reconcile([inst("a", capacity=4)])
        assert a.capacity == 4
        assert host.serving_changes == 1
        roster.reconcile([inst("a", capacity=4)])
        assert host.serving_changes == 1
