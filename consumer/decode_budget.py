"""An async semaphore counted in bytes: how much decode memory a replica may use at once.

A decode's bytes are estimated from the image header before any pixel is decoded
(`images.probe`); `reserve()` waits until that many bytes are free. Waiters are served in
arrival order, so a large image is never starved by a stream of small ones that keep
fitting beside each other. A request larger than the whole budget could never be served:
it is refused at once with `ImageTooLarge` instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from consumer.errors import ImageTooLarge

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

__all__ = ["DecodeBudget"]

_P = ParamSpec("_P")
_T = TypeVar("_T")
_MB = 1_000_000


class DecodeBudget:
    """At most `capacity_bytes` reserved at once; waiters are served first come, first served."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._in_use_bytes = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def __repr__(self) -> str:
        return (
            f"<DecodeBudget in_use={self._in_use_bytes // _MB}/{self.capacity_bytes // _MB} MB"
            f" waiting={len(self._waiters)}>"
        )

    @property
    def in_use_bytes(self) -> int:
        """Bytes reserved right now."""
        return self._in_use_bytes

    @property
    def waiting(self) -> int:
        """Reservations queued behind the ones in use."""
        return len(self._waiters)

    @asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        """Hold `nbytes` of the budget for the body; raises ImageTooLarge past the capacity."""
        await self._acquire(nbytes)
        try:
            yield
        finally:
            self._release(nbytes)

    async def run_in_thread(
        self, nbytes: int, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """`func` in a worker thread, holding `nbytes` until that thread has really ended.

        A thread cannot be cancelled: when the caller is, its bytes stay reserved until the
        thread returns, so the budget never counts memory that is still in use as free.
        """
        async with self.reserve(nbytes):
            call = functools.partial(func, *args, **kwargs)
            future = asyncio.get_running_loop().run_in_executor(None, call)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                await asyncio.wait({future})
                if not future.cancelled():
                    future.exception()  # retrieved: its result is of no use to anyone now
                raise

    async def _acquire(self, nbytes: int) -> None:
        self._refuse_impossible(nbytes)
        if not self._waiters and self._fits(nbytes):
            self._in_use_bytes += nbytes
            return
        granted = asyncio.get_running_loop().create_future()
        entry = (nbytes, granted)
        self._waiters.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            self._abandon(entry)
            raise

    def _refuse_impossible(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative number of bytes: {nbytes}")
        if nbytes > self.capacity_bytes:
            raise ImageTooLarge(
                f"decoding the image needs an estimated {nbytes // _MB} MB, more than the"
                f" whole decode budget of {self.capacity_bytes // _MB} MB"
                " (IMAGE_DECODE_BUDGET_BYTES)"
            )

    def _abandon(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        """A cancelled waiter: hand back bytes granted meanwhile, or leave the queue."""
        nbytes, granted = entry
        if granted.done() and not granted.cancelled():
            self._release(nbytes)
            return
        if entry in self._waiters:
            self._waiters.remove(entry)
        self._wake()  # it may have been the head that held the others back

    def _release(self, nbytes: int) -> None:
        self._in_use_bytes -= nbytes
        self._wake()

    def _wake(self) -> None:
        """Grant waiters in order while the head fits; bytes are counted at grant time."""
        while self._waiters:
            nbytes, granted = self._waiters[0]
            if not granted.cancelled() and not self._fits(nbytes):
                return
            self._waiters.popleft()
            if not granted.cancelled():  # a cancelled one is leaving: skip it
                self._in_use_bytes += nbytes
                granted.set_result(None)

    def _fits(self, nbytes: int) -> bool:
        return self._in_use_bytes + nbytes <= self.capacity_bytes
