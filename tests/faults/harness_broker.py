"""Broker faults on the shared local RabbitMQ, and putting it back the way it was."""

from __future__ import annotations

from tests.broker.ctl import (
    DEFAULT_WATERMARK,
    ctl,
    memory_alarm_on,
    set_memory_watermark,
    wait_until,
)

RESTORE_TIMEOUT_S = 60.0


async def stop_app() -> None:
    await ctl("stop_app")


async def start_app() -> None:
    """`start_app`, then wait until the node serves again."""
    await ctl("start_app")
    await ctl("await_startup", "--timeout", str(int(RESTORE_TIMEOUT_S)))


async def close_all_connections(reason: str = "test") -> None:
    await ctl("close_all_connections", reason)


async def raise_memory_alarm() -> None:
    """Watermark 0: every publishing connection blocks until `clear_memory_alarm`."""
    await set_memory_watermark("0")
    await wait_until(memory_alarm_on, RESTORE_TIMEOUT_S)


async def clear_memory_alarm() -> None:
    await set_memory_watermark(DEFAULT_WATERMARK)

    async def cleared() -> bool:
        return not await memory_alarm_on()

    await wait_until(cleared, RESTORE_TIMEOUT_S)


async def restore_broker() -> None:
    """Whatever a test did: the app running, the default watermark, no alarm."""
    await ctl("start_app")
    await ctl("await_startup", "--timeout", str(int(RESTORE_TIMEOUT_S)))
    await clear_memory_alarm()
