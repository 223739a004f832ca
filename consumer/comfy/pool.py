"""`InstancePool`: health-checked ComfyUI instances and fair, capacity-bounded dispatch.

    pool = await stack.enter_async_context(InstancePool(settings.instances(), ...))
    group.create_task(pool.run())                  # members' health loops, until cancelled
    demand = Demand(style.required_node_classes, style.models, Priority.BULK, owner=user_id)
    async with pool.slot(demand, exclude={"gpu-1"}) as instance:
        run = await instance.client.submit(prompt)
    pool.reconcile(desired)                        # membership (consumer/comfy/membership.py)

Dispatch (consumer/comfy/turns.py decides; `SCHEDULER=fair`): free slots go to interactive
waiters first, then to bulk waiters by owner in turn; each waiter gets a free instance that
holds its models when there is one, may wait a bounded time for a busy one that does, and
an interactive waiter may ask a staged bulk prompt for its place. `SCHEDULER=fifo`: arrival
order, the instance with the most free slots. A slot is released on every way out of the
`async with`; leaving it with `InstanceUnavailable` takes the instance out until the next
probe answers.

Health (consumer/comfy/health.py): each instance has a loop that probes it and takes it out
or puts it back (a circuit breaker with exponential backoff).

Membership (consumer/comfy/members.py): `reconcile(desired)` makes the pool hold the
desired instances. A new one joins out of service, until its health loop brings it in; a
removed one drains (no new prompt; it leaves once idle) and its prompts still running
`drain_grace_s` later are given up: retried elsewhere as `InstanceUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Self

from consumer.comfy.client import ComfyClient
from consumer.comfy.health import HealthPolicy, watch
from consumer.comfy.http import ClientTimeouts
from consumer.comfy.instance import Instance, InstanceStats
from consumer.comfy.members import ClientFactory, Roster
from consumer.comfy.preemption import StagedPrompts
from consumer.comfy.scheduling import Demand, LoadEstimates, ModelLoad
from consumer.comfy.turns import Turns, Waiter
from consumer.errors import InstanceStuck, InstanceUnavailable, WorkflowInvalid
from consumer.settings import ComfyInstanceSettings, SchedulerPolicy

log = logging.getLogger(__name__)
QUARANTINE_BASE_S = 1.0  # first breaker-open period after a stuck prompt, doubling in a row
DEFAULT_LOAD_PRIOR_S = 10.0  # a model load's estimate until one was seen
DEFAULT_DRAIN_GRACE_S = 30.0  # a removed instance's prompts may run this long, then given up
ANY_DEMAND = Demand()  # no node classes, no models, interactive


class InstancePool:
    """The ComfyUI instances; `run()` keeps their clients and health loops alive."""

    def __init__(
        self,
        instances: Sequence[ComfyInstanceSettings],
        *,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 30.0,
        health_interval_s: float = 5.0,
        breaker_max_backoff_s: float = 60.0,
        ws_reconnect_max_s: float = 10.0,
        history_wait_s: float = 10.0,
        outage_grace_s: float = 30.0,
        ws_heartbeat_s: float = 15.0,
        client_factory: ClientFactory | None = None,
        policy: SchedulerPolicy = SchedulerPolicy.FAIR,
        load_prior_s: float = DEFAULT_LOAD_PRIOR_S,
        drain_grace_s: float = DEFAULT_DRAIN_GRACE_S,
    ) -> None:
        self._timeouts = ClientTimeouts(
            connect_s=connect_timeout_s,
            request_s=request_timeout_s,
            ws_reconnect_max_s=ws_reconnect_max_s,
            history_wait_s=history_wait_s,
            outage_grace_s=outage_grace_s,
            ws_heartbeat_s=ws_heartbeat_s,
        )
        make = client_factory or (lambda s: ComfyClient(s.url, timeouts=self._timeouts))
        self._roster = Roster(
            make, host=self, drain_grace_s=drain_grace_s, withdraw_timeout_s=connect_timeout_s
        )
        for settings in instances:
            self._roster.admit(settings)
        self._health = HealthPolicy(health_interval_s, breaker_max_backoff_s, connect_timeout_s)
        self._quarantine_base_s = max(health_interval_s, QUARANTINE_BASE_S)
        self._turns = Turns(policy, LoadEstimates(load_prior_s))
        self._waiters: deque[Waiter] = deque()
        self._timer: asyncio.TimerHandle | None = None  # re-dispatch when a patience ends
        self._capacity_event = asyncio.Event()
        self._entered = False

    def __repr__(self) -> str:
        busy = sum(i.in_flight for i in self.instances)
        total = sum(i.capacity for i in self.instances)
        healthy, queued = self.healthy_capacity(), len(self._waiters)
        draining = sum(i.draining for i in self.instances)
        return (
            f"<InstancePool busy={busy}/{total} healthy={healthy} queued={queued}"
            f" draining={draining}>"
        )

    @property
    def instances(self) -> list[Instance]:
        """The members, draining ones included (until they leave)."""
        return self._roster.instances

    # -- public -----------------------------------------------------------------------

    @property
    def policy(self) -> SchedulerPolicy:
        return self._turns.policy

    @property
    def load_estimates(self) -> LoadEstimates:
        return self._turns.load_estimates

    @property
    def staged(self) -> StagedPrompts:
        """Bulk prompts queued on an instance, not started (consumer.comfy.preemption)."""
        return self._turns.staged

    def slot(
        self, demand: Demand = ANY_DEMAND, exclude: Iterable[str] = ()
    ) -> AbstractAsyncContextManager[Instance]:
        """Hold one slot on a healthy instance that has the demand's node classes; avoid
        `exclude` (instance names) when another capable instance is healthy. Raises
        WorkflowInvalid when no instance of the pool offers the required node classes."""
        return self._slot(demand, frozenset(exclude))

    def learn(self, loads: Iterable[ModelLoad]) -> None:
        """Loads a finished prompt paid, to estimate the next ones."""
        for load in loads:
            self.load_estimates.learn(load)

    def find(self, name: str) -> Instance | None:
        """The instance called `name`, if the pool has one (and is not draining it)."""
        return next((i for i in self.instances if i.name == name and not i.draining), None)

    def healthy_capacity(self) -> int:
        """Total slots of the healthy instances not draining (the consumer's prefetch)."""
        return sum(i.capacity for i in self.instances if i.serving)

    async def capacity_changed(self) -> None:
        """Return when `healthy_capacity()` changes."""
        await self._capacity_event.wait()

    @property
    def capacity_event(self) -> asyncio.Event:
        """Set at the next change of `healthy_capacity()` (take it before checking)."""
        return self._capacity_event

    @property
    def membership_event(self) -> asyncio.Event:
        """Set at the next join, drain, restore or leave (take it before checking)."""
        return self._roster.event

    @property
    def membership_changes(self) -> dict[str, int]:
        """Members added and removed since start ("added", "removed")."""
        return {"added": self._roster.changes["added"], "removed": self._roster.changes["removed"]}

    def stats(self) -> list[InstanceStats]:
        return [i.stats() for i in self.instances]

    def reconcile(self, desired: Sequence[ComfyInstanceSettings]) -> None:
        """Make the members the `desired` instances: new ones join (out of service until
        probed), missing ones drain and leave. Before `run()`, applied when it starts."""
        self._roster.reconcile(desired)

    async def __aenter__(self) -> Self:
        """Open every instance's client (session + WebSocket)."""
        await self._roster.open_clients()
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._entered = False
        await self._roster.close_clients()

    async def run(self) -> None:
        """Run every member until cancelled (entering the pool first if not done yet)."""
        if self._entered:
            await self._run_members()
        else:
            async with self:
                await self._run_members()

    async def _run_members(self) -> None:
        try:
            await self._roster.run()
        finally:
            self._all_down()

    # Host, for the roster

    async def watch(self, instance: Instance) -> None:
        """The health loop of one member, until cancelled."""
        await watch(instance, self._health, put_back=self._put_back, take_out=self._take_out)

    def serving_changed(self) -> None:
        self._capacity_changed()
        self._dispatch()

    # -- dispatch ---------------------------------------------------------------------

    @asynccontextmanager
    async def _slot(self, demand: Demand, exclude: frozenset[str]) -> AsyncIterator[Instance]:
        instance = await self._acquire(demand, exclude)
        started = time.monotonic()
        try:
            yield instance
        except InstanceStuck:
            delay_s = instance.quarantine(self._quarantine_base_s, self._health.max_backoff_s)
            self._take_out(instance, f"a prompt got stuck on it; breaker open for {delay_s:.1f}s")
            raise
        except InstanceUnavailable:
            instance.wake.set()  # let its health loop probe it now
            self._take_out(instance, "a prompt failed on it")
            raise
        else:
            instance.consecutive_stuck = 0
            instance.record_execution(time.monotonic() - started)
        finally:
            self._release(instance, demand)

    async def _acquire(self, demand: Demand, exclude: frozenset[str]) -> Instance:
        self._check_satisfiable(demand.required_nodes)
        loop = asyncio.get_running_loop()
        waiter = Waiter(demand, exclude, loop.create_future(), loop.time())
        self._waiters.append(waiter)
        self._dispatch()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(waiter.future.result(), demand)  # granted as we were cancelled
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _dispatch(self) -> None:
        """Hand free slots to waiters in their turn, skipping those no free instance suits;
        then let interactive work still waiting ask staged bulk prompts for their places."""
        now = asyncio.get_running_loop().time()
        waiters = list(self._waiters)
        for waiter in self._turns.in_turn(waiters):
            if waiter.future.done():
                continue
            choice = self._turns.pick(waiter, waiters, self.instances, now)
            if isinstance(choice, Instance):
                self._grant(waiter, choice)
            elif choice is not None:
                self._wake_at(choice)
        self._turns.ask_for_places(waiters)

    def _grant(self, waiter: Waiter, instance: Instance) -> None:
        self._turns.granted(waiter, instance)
        waiter.future.set_result(instance)

    def _wake_at(self, when: float) -> None:
        """Dispatch again at `when` (the earliest pending patience end wins)."""
        if self._timer is not None and self._timer.when() <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _release(self, instance: Instance, demand: Demand) -> None:
        instance.in_flight -= 1
        instance.last_released_at = time.monotonic()
        self._turns.released(demand, self._waiters)
        self._roster.released(instance)
        self._dispatch()

    def _check_satisfiable(self, required: frozenset[str]) -> None:
        """WorkflowInvalid once every member's node classes are known and none has them all
        (members draining do not count; with none left, waiters wait for one to join)."""
        members = [i for i in self.instances if not i.draining]
        if not required or not members or any(i.node_classes is None for i in members):
            return
        if any(not i.missing(required) for i in members):
            return
        lacks = "; ".join(
            f"{i.name} lacks {', '.join(sorted(i.missing(required)))}" for i in members
        )
        raise WorkflowInvalid(
            f"no ComfyUI instance offers the node classes this workflow needs: {lacks}"
        )

    def _fail_hopeless_waiters(self) -> None:
        for waiter in self._waiters:
            try:
                self._check_satisfiable(waiter.demand.required_nodes)
            except WorkflowInvalid as exc:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)

    # -- health verdicts --------------------------------------------------------------

    def _put_back(self, instance: Instance) -> None:
        instance.consecutive_failures = 0
        if not instance.healthy:
            log.info("instance %s (%s) is healthy", instance.name, instance.url)
            instance.healthy = True
            self._fail_hopeless_waiters()
            self._capacity_changed()
            self._dispatch()

    def _take_out(self, instance: Instance, reason: str) -> None:
        if instance.healthy:
            log.warning("instance %s taken out: %s", instance.name, reason)
            instance.healthy = False
            instance.memory.forget()
            self._capacity_changed()

    def _all_down(self) -> None:
        for instance in self.instances:
            instance.healthy = False
        self._capacity_changed()

    def _capacity_changed(self) -> None:
        self._capacity_event.set()
        self._capacity_event = asyncio.Event()
