"""The pool's members: which instances it has, each one's life from joining to leaving.

    roster = Roster(make_client, host=pool, drain_grace_s=30, withdraw_timeout_s=5)
    roster.admit(settings)                       # the instances the pool starts with
    group.create_task(roster.run())              # members come and go, until cancelled
    roster.reconcile(desired)                    # consumer/comfy/membership.py calls this

An instance is known by its name (`ComfyInstanceSettings.label`): the name is its metric
label and what `exclude` and adoption refer to, so two members never share one. A name
listed twice keeps its first entry. `plan` is the pure diff; `Roster` carries it out:

- a new name joins out of service: its member task opens its client and runs its health
  loop (`host.watch`), which brings it in once it answers;
- a name no longer listed (or listed at another URL) drains: no new prompt (it stops
  `serving`), its running prompts go on, and it leaves once idle: health loop stopped,
  client closed. Prompts still running `drain_grace_s` after the removal are given up:
  they fail as `InstanceUnavailable`, so their tasks are retried elsewhere, and are
  withdrawn from the instance. A name that moved joins again at its new URL once the old
  member has left;
- a draining name listed again before it left is restored as it is (unless its prompts
  were given up: then it leaves, and joins anew);
- a listed name with another max_concurrency is resized in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Protocol

from consumer.comfy.client import ComfyClient
from consumer.comfy.instance import Instance
from consumer.settings import ComfyInstanceSettings

log = logging.getLogger(__name__)

ClientFactory = Callable[[ComfyInstanceSettings], ComfyClient]


@dataclass(frozen=True, slots=True)
class Member:
    """An instance of the pool as the diff sees it."""

    settings: ComfyInstanceSettings
    draining: bool = False


@dataclass(frozen=True, slots=True)
class Changes:
    """Joins (new names), drains (gone or moved), restores (back before they left), resizes."""

    join: tuple[ComfyInstanceSettings, ...] = ()
    drain: tuple[str, ...] = ()
    restore: tuple[str, ...] = ()
    resize: tuple[tuple[str, int], ...] = ()


def plan(current: Mapping[str, Member], desired: Sequence[ComfyInstanceSettings]) -> Changes:
    """The changes that take the members from `current` (by name) to `desired`."""
    wanted: dict[str, ComfyInstanceSettings] = {}
    for settings in desired:
        wanted.setdefault(settings.label, settings)
    kept = {name: wanted[name] for name, m in current.items() if _same(wanted.get(name), m)}
    return Changes(
        join=tuple(s for name, s in wanted.items() if name not in current),
        drain=tuple(name for name, m in current.items() if not m.draining and name not in kept),
        restore=tuple(name for name, m in current.items() if m.draining and name in kept),
        resize=tuple(
            (name, s.max_concurrency)
            for name, s in kept.items()
            if s.max_concurrency != current[name].settings.max_concurrency
        ),
    )


def _same(settings: ComfyInstanceSettings | None, member: Member) -> bool:
    """The same server: listed, at the same URL (its capacity may differ)."""
    return settings is not None and settings.url == member.settings.url


class Host(Protocol):
    """What a roster needs from its pool."""

    async def watch(self, instance: Instance) -> None:
        """Run the instance's health loop until cancelled."""
        ...

    def serving_changed(self) -> None:
        """The serving capacity changed (a member drained, came back or was resized)."""
        ...


class Roster:
    """The members: `instances`, their clients, their tasks while `run()` runs."""

    def __init__(
        self,
        make_client: ClientFactory,
        *,
        host: Host,
        drain_grace_s: float,
        withdraw_timeout_s: float,
    ) -> None:
        self.instances: list[Instance] = []
        self.changes: Counter[str] = Counter()  # "added" / "removed", since start
        self._make_client = make_client
        self._host = host
        self._drain_grace_s = drain_grace_s
        self._withdraw_timeout_s = withdraw_timeout_s
        self._settings: dict[str, ComfyInstanceSettings] = {}  # by instance name
        self._clients: dict[Instance, AsyncExitStack] = {}  # the open ones
        self._group: asyncio.TaskGroup | None = None  # the members' tasks, while running
        self._desired: list[ComfyInstanceSettings] | None = None  # the last reconcile()
        self._event = asyncio.Event()

    def __repr__(self) -> str:
        draining = sum(i.draining for i in self.instances)
        return f"<Roster members={len(self.instances)} draining={draining}>"

    @property
    def event(self) -> asyncio.Event:
        """Set at the next join, drain, restore, give-up, leave, or slot released while
        draining."""
        return self._event

    def admit(self, settings: ComfyInstanceSettings) -> Instance:
        """Add a member (its client opens and its health loop starts in `run()`)."""
        instance = Instance(settings.label, self._make_client(settings), settings.max_concurrency)
        self.instances.append(instance)
        self._settings[instance.name] = settings
        return instance

    def reconcile(self, desired: Sequence[ComfyInstanceSettings]) -> None:
        """Make the members `desired`; before `run()`, applied when it starts."""
        self._desired = list(desired)
        self._apply()

    def released(self, instance: Instance) -> None:
        """A slot of `instance` was released: a draining member may leave now."""
        if instance.draining:
            self._changed()

    async def open_clients(self) -> None:
        try:
            for instance in self.instances:
                await self._open_client(instance)
        except BaseException:
            await self.close_clients()
            raise

    async def close_clients(self) -> None:
        """Close every open client, the last opened first, each whatever the others do."""
        stacks, self._clients = list(self._clients.values()), {}
        async with AsyncExitStack() as all_clients:
            for stack in stacks:
                all_clients.push_async_callback(stack.aclose)

    async def run(self) -> None:
        """Run every member (and those that join) until cancelled."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for instance in self.instances:
                    self._spawn(instance)
                self._apply()
                await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._group = None

    # -- one member's life ------------------------------------------------------------

    def _spawn(self, instance: Instance) -> None:
        if self._group is not None:
            self._group.create_task(self._member(instance), name=f"member {instance.name}")

    async def _member(self, instance: Instance) -> None:
        await self._open_client(instance)
        async with asyncio.TaskGroup() as group:
            health = group.create_task(self._host.watch(instance), name=f"health {instance.name}")
            await self._drained(instance)
            health.cancel()
        await self._close_client(instance)
        self._leave(instance)

    async def _drained(self, instance: Instance) -> None:
        """Return once `instance` drains with no slot held; past its drain deadline, give
        its prompts up first."""
        loop = asyncio.get_running_loop()
        while not (instance.draining and instance.in_flight == 0):
            changed = self._event
            if loop.time() >= instance.drain_deadline:
                instance.drain_deadline = math.inf
                await self._give_up(instance)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(instance.drain_deadline):
                    await changed.wait()

    async def _give_up(self, instance: Instance) -> None:
        """Fail its prompts as InstanceUnavailable (retried elsewhere); withdraw them."""
        grace = f"COMFYUI_DRAIN_GRACE_S={self._drain_grace_s:g}s"
        prompt_ids = instance.client.abandon(f"{instance.name} was removed from the pool ({grace})")
        self._changed()
        log.warning(
            "instance %s was removed with %d slot(s) still in use after %s: their prompts"
            " are given up, and their tasks retried elsewhere",
            instance.name,
            instance.in_flight,
            grace,
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._withdraw_timeout_s):
                await instance.client.stop_prompts(prompt_ids)

    async def _open_client(self, instance: Instance) -> None:
        if instance not in self._clients:
            stack = AsyncExitStack()
            await stack.enter_async_context(instance.client)
            self._clients[instance] = stack

    async def _close_client(self, instance: Instance) -> None:
        stack = self._clients.pop(instance, None)
        if stack is not None:
            await stack.aclose()

    # -- changes ----------------------------------------------------------------------

    def _apply(self) -> None:
        if self._group is None or self._desired is None:
            return
        current = {
            i.name: Member(self._settings[i.name], draining=i.draining) for i in self.instances
        }
        changes = plan(current, self._desired)
        for settings in changes.join:
            self._join(settings)
        for name in changes.drain:
            self._drain(self._named(name))
        for name in changes.restore:
            self._restore(self._named(name))
        for name, capacity in changes.resize:
            self._resize(self._named(name), capacity)

    def _named(self, name: str) -> Instance:
        return next(i for i in self.instances if i.name == name)

    def _join(self, settings: ComfyInstanceSettings) -> None:
        instance = self.admit(settings)
        log.info("instance %s (%s) joins the pool; probing it", instance.name, instance.url)
        self.changes["added"] += 1
        self._spawn(instance)
        self._changed()

    def _drain(self, instance: Instance) -> None:
        log.info(
            "instance %s is no longer listed: draining (%d slot(s) in use, at most %gs)",
            instance.name,
            instance.in_flight,
            self._drain_grace_s,
        )
        instance.draining = True
        instance.drain_deadline = asyncio.get_running_loop().time() + self._drain_grace_s
        self._host.serving_changed()
        self._changed()

    def _restore(self, instance: Instance) -> None:
        if instance.given_up:  # its client refuses prompts now: it leaves, then joins anew
            return
        log.info("instance %s is listed again: back in service", instance.name)
        instance.draining = False
        instance.drain_deadline = math.inf
        self._host.serving_changed()
        self._changed()

    def _resize(self, instance: Instance, capacity: int) -> None:
        log.info(
            "instance %s: max_concurrency %d -> %d", instance.name, instance.capacity, capacity
        )
        instance.capacity = capacity
        settings = self._settings[instance.name]
        self._settings[instance.name] = settings.model_copy(update={"max_concurrency": capacity})
        self._host.serving_changed()

    def _leave(self, instance: Instance) -> None:
        log.info("instance %s left the pool", instance.name)
        self.instances.remove(instance)
        del self._settings[instance.name]
        self.changes["removed"] += 1
        self._changed()
        self._apply()  # the name may join again, at its new URL

    def _changed(self) -> None:
        self._event.set()
        self._event = asyncio.Event()
