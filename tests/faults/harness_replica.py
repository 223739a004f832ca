"""A consumer replica as a real process: `python -m consumer`, its JSON log read as it comes.

The process logs one JSON object per line on stderr. A reader task parses every line into
`Replica.logs` and wakes whoever waits on a line (`wait_log`), so tests await "ready",
"stopped" or any other line instead of sleeping. Lines that are not JSON (a crash before
logging is set up) are kept as `{"msg": <line>, "raw": true}`.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

START_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
LINE_LIMIT_BYTES = 4 * 1024 * 1024
PR_SET_PDEATHSIG = 1  # linux/prctl.h
LogLine = dict[str, Any]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the sidecar binds it next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when pytest dies (a test timeout skips clean-up)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _parse(raw: bytes) -> LogLine:
    text = raw.decode(errors="replace").rstrip("\n")
    try:
        line = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"msg": text, "raw": True}
    return line if isinstance(line, dict) else {"msg": text, "raw": True}


class ReplicaExited(RuntimeError):
    """The process ended while a test waited for a log line."""


class Replica:
    """One `python -m consumer` process; `start()` again after it ended restarts it."""

    def __init__(self, name: str, env: Mapping[str, str], workdir: Path) -> None:
        self.name = name
        self.env = dict(env)
        self.workdir = workdir
        self.logs: list[LogLine] = []
        self.exit_codes: list[int] = []
        self.unexpected_exits: list[int] = []  # ended without kill()/terminate(): a crash
        self._signalled = False
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._log_path = workdir / f"{name}.log"
        self._mark = 0

    def __repr__(self) -> str:
        return f"<Replica {self.name} pid={self.pid} lines={len(self.logs)}>"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def sidecar_url(self) -> str:
        return f"http://127.0.0.1:{self.env['SIDECAR_PORT']}"

    async def start(self, *, wait_ready: bool = True) -> None:
        """Spawn the process (a fresh sidecar port each time) and wait for its "ready" line."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self.env["SIDECAR_PORT"] = str(free_port())
        self._mark = len(self.logs)
        self._signalled = False
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "consumer",
            env={**os.environ, **self.env},
            cwd=self.workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT_BYTES,
            preexec_fn=_die_with_parent,
        )
        self._reader = asyncio.create_task(self._read(self._proc), name=f"{self.name}-stderr")
        if wait_ready:
            await self.wait_log(lambda line: line.get("msg") == "ready", START_TIMEOUT_S)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        with self._log_path.open("ab", buffering=0) as copy:
            while raw := await proc.stderr.readline():
                copy.write(raw)
                async with self._changed:
                    self.logs.append(_parse(raw))
                    self._changed.notify_all()
        await proc.wait()
        async with self._changed:
            code = proc.returncode if proc.returncode is not None else -1
            self.exit_codes.append(code)
            if not self._signalled:
                self.unexpected_exits.append(code)
            self._changed.notify_all()

    async def wait_log(self, predicate: Callable[[LogLine], bool], timeout_s: float) -> LogLine:
        """The first line of the current run matching `predicate`; raises if the process ends."""
        async with asyncio.timeout(timeout_s), self._changed:
            while True:
                for line in self.logs[self._mark :]:
                    if predicate(line):
                        return line
                if self._reader is None or self._reader.done():
                    raise ReplicaExited(f"{self!r} ended; last lines: {self.tail()}")
                await self._changed.wait()

    def tail(self, count: int = 10) -> list[LogLine]:
        return self.logs[-count:]

    def lines(self, prefix: str) -> list[LogLine]:
        """Every line (all runs) whose formatted `msg` starts with `prefix`."""
        return [line for line in self.logs if str(line.get("msg", "")).startswith(prefix)]

    async def kill(self) -> int:
        """`kill -9`: no shutdown at all; returns the exit code (-9)."""
        return await self._signal(signal.SIGKILL)

    async def terminate(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """SIGTERM, then wait (up to `timeout_s`) for the exit code."""
        return await self._signal(signal.SIGTERM, timeout_s)

    async def restart(self) -> None:
        """Kill the process if it runs, then start it again with the same environment."""
        if self.running:
            await self.kill()
        await self.start()

    async def _signal(self, sig: signal.Signals, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        proc, reader = self._proc, self._reader
        if proc is None or reader is None:
            raise RuntimeError(f"{self!r} was never started")
        if proc.returncode is None:
            self._signalled = True
            proc.send_signal(sig)
        async with asyncio.timeout(timeout_s):
            await reader
        return proc.returncode if proc.returncode is not None else -1

    async def close(self) -> None:
        """Test clean-up: SIGTERM, SIGKILL if it does not end in time, reap the reader."""
        if self._proc is None:
            return
        try:
            await self.terminate()
        except TimeoutError:
            await self.kill()
