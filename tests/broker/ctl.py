"""`rabbitmqctl` from tests: read back what the broker holds, close connections, raise alarms."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RABBITMQCTL = "rabbitmqctl"
CTL_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1
DEFAULT_WATERMARK = "0.4"  # RabbitMQ 3.10's default; 4.x uses 0.6


async def ctl(*args: str) -> str:
    """Run rabbitmqctl with `args`; return stdout, raise with stderr on failure."""
    proc = await asyncio.create_subprocess_exec(
        RABBITMQCTL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(CTL_TIMEOUT_S):
        stdout, stderr = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {stderr.decode()}")
    return stdout.decode()


async def import_definitions(text: str) -> None:
    """Import a definitions document (asynchronous on the broker's side).

    The Debian wrapper runs the CLI as the `rabbitmq` user, which cannot read pytest's
    private temporary directories (and 3.10 refuses `-` for stdin): use a readable file.
    """
    with _world_readable_file(text) as path:
        await ctl("import_definitions", str(path))


@contextmanager
def _world_readable_file(text: str) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(suffix=".json")
    path = Path(name)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        path.chmod(0o644)
        yield path
    finally:
        path.unlink()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    """Poll `check` until it holds. Only for broker state that has no notification to await."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - rabbitmqctl state offers nothing to await
            await asyncio.sleep(POLL_INTERVAL_S)


async def export_definitions(prefix: str) -> dict[str, list[dict[str, Any]]]:
    """The broker's exchanges, queues and bindings whose names start with `prefix.`."""
    data = json.loads(await ctl("export_definitions", "-", "--format", "json"))
    mine = f"{prefix}."
    return {
        "exchanges": [e for e in data["exchanges"] if e["name"].startswith(mine)],
        "queues": [q for q in data["queues"] if q["name"].startswith(mine)],
        "bindings": [b for b in data["bindings"] if b["destination"].startswith(mine)],
    }


async def connection_pids(connection_name: str) -> list[str]:
    """Pids of the open connections whose client-provided name is `connection_name`."""
    out = await ctl("list_connections", "pid", "client_properties", "--no-table-headers", "-q")
    needle = f'{{"connection_name","{connection_name}"}}'
    return [line.split("\t", 1)[0] for line in out.splitlines() if needle in line]


async def close_connection(connection_name: str) -> None:
    """Close (as the broker) every connection named `connection_name`."""
    for pid in await connection_pids(connection_name):
        await ctl("close_connection", pid, "closed by test")


async def memory_watermark() -> list[str]:
    """The current watermark as `set_vm_memory_high_watermark` arguments (to restore it)."""
    out = (await ctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")).strip()
    if out.startswith("{absolute,"):
        return ["absolute", out.removeprefix("{absolute,").rstrip("}")]
    return [out] if out.replace(".", "", 1).isdigit() else [DEFAULT_WATERMARK]


async def set_memory_watermark(*args: str) -> None:
    """`0` raises a memory alarm that blocks every publishing connection, cluster-wide."""
    await ctl("set_vm_memory_high_watermark", *args)


async def memory_alarm_on() -> bool:
    """Whether the node currently has a memory alarm."""
    return "memory" in await ctl("eval", "rabbit_alarm:get_alarms().")
