"""`python -m consumer`: build settings once, configure logs, run the service until SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

from consumer.app import Service
from consumer.errors import WorkflowInvalid
from consumer.logs import configure_logging
from consumer.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


@contextmanager
def signal_handlers(stop: asyncio.Event, reload: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop`; SIGHUP calls `reload` (which only sets an Event too).

    The handlers live on the running loop for the block's duration.
    """
    loop = asyncio.get_running_loop()
    handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set, signal.SIGHUP: reload}
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    try:
        yield
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)


async def serve(settings: Settings) -> None:
    """Run one replica; signals only set Events (phased shutdown, or a catalog reload)."""
    stop = asyncio.Event()
    service = Service(settings)
    with signal_handlers(stop, service.reload_styles):
        await service.run(stop)


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"style-consumer: {exc}", file=sys.stderr)  # noqa: T201 - before logging exists
        return 2
    configure_logging(settings.log_level, debug=settings.debug)
    try:
        asyncio.run(serve(settings))
    except WorkflowInvalid as exc:
        print(f"style-consumer: {exc}", file=sys.stderr)  # noqa: T201 - a start-up refusal
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
