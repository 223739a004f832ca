"""The health loop of one instance: probe it, take it out or put it back, sleep, again.

Every `interval_s`, GET /system_stats and check the WebSocket; /object_info is read again
whenever the instance comes back (a restart may change its custom nodes). A failing
instance is probed with exponential backoff capped at `max_backoff_s` (a circuit
breaker); a quarantined one (its prompts stopped finishing) stays out until the quarantine
ends, whatever the probes say. Setting `instance.wake` makes it probe at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from consumer.comfy.instance import Instance, breaker_delay_s
from consumer.errors import InstanceUnavailable


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """How often to probe, how far to back off, how long a socket may take to connect."""

    interval_s: float
    max_backoff_s: float
    connect_s: float


async def watch(
    instance: Instance,
    policy: HealthPolicy,
    *,
    put_back: Callable[[Instance], None],
    take_out: Callable[[Instance, str], None],
) -> None:
    """Probe `instance` until cancelled, reporting each verdict to the pool."""
    while True:
        reason = await probe(instance, policy.connect_s)
        if reason is None and instance.quarantined:
            reason = "circuit open: its prompts stopped finishing"
        if reason is None:
            put_back(instance)
        else:
            instance.consecutive_failures += 1
            take_out(instance, reason)
        await _sleep(instance, policy)


async def probe(instance: Instance, connect_s: float) -> str | None:
    """None when the instance answers and its socket is up; else why not."""
    client = instance.client
    try:
        await client.system_stats()
        if not await client.wait_connected(connect_s):
            return "its websocket is not connected"
        if instance.node_classes is None or not instance.healthy:
            instance.node_classes = await client.node_classes()
            instance.forget_node_classes_log()
    except InstanceUnavailable as exc:
        return str(exc)
    return None


async def _sleep(instance: Instance, policy: HealthPolicy) -> None:
    delay_s = breaker_delay_s(
        instance.consecutive_failures, policy.interval_s, policy.max_backoff_s
    )
    if instance.quarantined:
        delay_s = max(delay_s, instance.quarantined_until - time.monotonic())
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay_s):
            await instance.wake.wait()
    instance.wake.clear()
