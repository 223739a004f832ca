"""`python -m consumer`: build settings once, configure logs, run the service until SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys

from consumer.app import Service
from consumer.errors import WorkflowInvalid
from consumer.logs import configure_logging
from consumer.settings import Settings, SettingsError, load_settings


async def serve(settings: Settings) -> None:
    """Run one replica; SIGTERM or SIGINT only set the stop event (phased shutdown follows)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Service(settings).run(stop)


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
