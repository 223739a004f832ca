"""`PromptRun`: one submitted prompt, fed by the client's socket, awaited by the pipeline.

The socket (or the reconciliation after a reconnect) settles a run with a verdict:
finished (read /history), gone (not in /queue nor /history: read /history a while longer,
then call it lost), or an error. `wait()` turns the verdict into outputs or an exception.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

from consumer.comfy.messages import (
    Event,
    Executed,
    Executing,
    ExecutionCached,
    ExecutionFailed,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    HistoryEntry,
    OutputImage,
    Progress,
)
from consumer.comfy.progress import ProgressTracker
from consumer.errors import (
    ComfyExecutionError,
    ConsumerError,
    InstanceUnavailable,
    TaskCancelled,
    TaskTimeout,
)

log = logging.getLogger(__name__)

_FIRST_POLL_S = 0.02
_MAX_POLL_S = 1.0


class Remote(Protocol):
    """What a run needs from its client."""

    @property
    def base_url(self) -> str: ...
    @property
    def history_wait_s(self) -> float: ...

    async def history(self, prompt_id: str) -> HistoryEntry | None: ...
    async def cancel_prompt(self, prompt_id: str, started: bool) -> bool: ...
    async def withdraw_prompt(self, prompt_id: str) -> bool: ...
    def forget(self, prompt_id: str) -> None: ...


class Verdict(enum.Enum):
    FINISHED = "finished"  # the socket saw execution_success: outputs are (soon) in /history
    GONE = "gone"  # neither queued nor in history at reconciliation: late history, or lost


class PromptRun:
    """A prompt queued on one instance. Await `wait()`; iterate `progress()`; `cancel()`."""

    def __init__(self, prompt_id: str, graph: frozenset[str], remote: Remote) -> None:
        self.prompt_id = prompt_id
        self.accepted = False
        self.started = False
        self.created_ns = time.time_ns()  # wall clock, for the trace's `comfyui.queue` span
        self.started_ns: int | None = None
        self._begun = asyncio.Event()  # set when it starts, or ends without starting
        self._remote = remote
        self._tracker = ProgressTracker(graph)
        self._outcome: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()
        self._closed = False
        self._cancel_requested = False
        self._left_for_adoption = False
        self._seen_images: list[OutputImage] = []
        self.cached_nodes: frozenset[str] = frozenset()  # as `execution_cached` listed them
        self.node_seconds: dict[str, float] = {}  # executed node -> seconds, by the socket
        self._current: tuple[str, float] | None = None  # the node executing, since when

    def __repr__(self) -> str:
        state = "done" if self.done else ("running" if self.started else "queued")
        return f"<PromptRun {self.prompt_id} {state} {self._tracker.percent}%>"

    def mark_started(self) -> None:
        """The instance began executing it (it left the queue)."""
        if not self.started:
            self.started_ns = time.time_ns()
        self.started = True
        self._begun.set()

    async def wait_started(self) -> None:
        """Return once the prompt runs (or has ended without running)."""
        await self._begun.wait()

    @property
    def begun(self) -> asyncio.Event:
        """Set once the prompt runs (or has ended without running)."""
        return self._begun

    @property
    def done(self) -> bool:
        return self._outcome.done()

    @property
    def percent(self) -> int:
        return self._tracker.percent

    # -- fed by the client ------------------------------------------------------------

    def feed(self, event: Event) -> None:
        """Apply one socket event addressed to this prompt."""
        match event:
            case ExecutionStart():
                self.mark_started()
            case ExecutionCached(nodes=nodes):
                self.cached_nodes = nodes
                self._tracker.cached(nodes)
            case Executing(node=node):
                self.mark_started()
                self._time_node(node)
                self._tracker.executing(node)
            case Progress(node=node, value=value, max=maximum):
                self._tracker.progress(node, value, maximum)
            case Executed(node=node, images=images):
                self._seen_images.extend(images)
                self._tracker.executed(node)
            case ExecutionSuccess():
                self._time_node(None)
                self.settle(Verdict.FINISHED)
            case ExecutionFailed() | ExecutionInterrupted():
                self.fail(self._failure(event))
            case _:
                return
        self._notify()

    def settle(self, verdict: Verdict) -> None:
        if not self._outcome.done():
            if verdict is Verdict.FINISHED:
                self._tracker.succeeded()
            self._outcome.set_result(verdict)
            self._notify()

    def fail(self, error: ConsumerError) -> None:
        if not self._outcome.done():
            self._outcome.set_exception(error)
            self._outcome.exception()  # wait() raises it; no "never retrieved" log if unawaited
            self._close()

    def settle_from_history(self, entry: HistoryEntry | None) -> None:
        """Reconciliation found the prompt finished (entry) or nowhere (None)."""
        if entry is None:
            self.settle(Verdict.GONE)
        elif entry.succeeded:
            self.settle(Verdict.FINISHED)
        else:
            self.fail(self._history_failure(entry))

    # -- used by the pipeline --------------------------------------------------------

    async def progress(self) -> AsyncIterator[int]:
        """Monotonic 0..100 figures, each at most once; ends when the instance is done with
        the prompt (100 on success), so it may be drained before calling `wait()`."""
        last = -1
        while True:
            changed = self._changed
            if self._tracker.percent > last:
                last = self._tracker.percent
                yield last
            if self._closed or self._outcome.done():
                return
            await changed.wait()

    async def wait(self, timeout_s: float | None = None) -> list[OutputImage]:
        """The output images; raises ComfyExecutionError, InstanceUnavailable, TaskTimeout..."""
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                return await self._result()
        except TimeoutError:
            if not deadline.expired():
                raise
            await self._abandon()
            message = f"prompt {self.prompt_id} on {self._remote.base_url} ran past {timeout_s}s"
            raise TaskTimeout(f"{message}; interrupted it") from None
        except asyncio.CancelledError:
            if not self._left_for_adoption:
                await self._abandon()
            raise
        finally:
            self._close()
            self._remote.forget(self.prompt_id)

    def leave_for_adoption(self) -> None:
        """From now on, cancelling `wait()` leaves the prompt on the instance (neither deleted
        from its queue nor interrupted), for the replica that gets the task next to adopt.

        Only sound where that replica can find it: a shared task store that records the
        prompt's id and instance. `cancel()` and `wait()`'s own deadline still stop it.
        """
        self._left_for_adoption = True

    async def withdraw(self) -> bool:
        """Take the prompt back from the instance's queue before it starts, to give its place
        to more urgent work. True when it is gone unrun: the run is over and `wait()` must
        not be called. False when it started or ended meanwhile: it goes on as usual."""
        if self.started or self.done or self._cancel_requested:
            return False
        if not await self._remote.withdraw_prompt(self.prompt_id) or self.started:
            return False
        if (entry := await self._remote.history(self.prompt_id)) is not None:
            self.settle_from_history(entry)  # it ran and finished in between
            return False
        self._cancel_requested = True
        self.fail(self._cancelled())
        self._remote.forget(self.prompt_id)
        return True

    async def cancel(self) -> None:
        """Delete the prompt if still queued, interrupt it if running; only ever this one."""
        if self.done or self._cancel_requested:
            return
        self._cancel_requested = True
        if not await self._remote.cancel_prompt(self.prompt_id, self.started):
            entry = await self._remote.history(self.prompt_id)
            self.settle_from_history(entry) if entry else self.fail(self._cancelled())

    # -- internals --------------------------------------------------------------------

    async def _result(self) -> list[OutputImage]:
        verdict = await asyncio.shield(self._outcome)
        entry = await self._poll_history()
        if entry is None:
            return self._without_history(verdict)
        if not entry.succeeded:
            raise self._history_failure(entry)
        self._tracker.succeeded()
        return list(entry.images)

    async def _poll_history(self) -> HistoryEntry | None:
        """/history/{id} may be `{}` for a moment after execution_success: poll with backoff."""
        deadline = time.monotonic() + self._remote.history_wait_s
        delay_s = _FIRST_POLL_S
        while (entry := await self._remote.history(self.prompt_id)) is None:
            if time.monotonic() + delay_s > deadline:
                return None
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, _MAX_POLL_S)
        return entry

    def _without_history(self, verdict: Verdict) -> list[OutputImage]:
        where = f"prompt {self.prompt_id} on {self._remote.base_url}"
        if verdict is Verdict.FINISHED and self._seen_images:
            log.warning(
                "%s: no /history after %ss; using the socket's outputs",
                where,
                self._remote.history_wait_s,
            )
            self._tracker.succeeded()
            return list(self._seen_images)
        if self._cancel_requested:
            raise self._cancelled()
        if verdict is Verdict.FINISHED:
            raise InstanceUnavailable(f"{where} finished but never showed up in /history")
        raise InstanceUnavailable(
            f"{where} vanished from its queue and history (instance restarted?)"
        )

    async def _abandon(self) -> None:
        """Stop our prompt on the way out (timeout or cancellation), quietly."""
        try:
            await self.cancel()
        except ConsumerError as exc:
            log.warning("could not cancel prompt %s: %s", self.prompt_id, exc)

    def _failure(self, event: ExecutionFailed | ExecutionInterrupted) -> ConsumerError:
        where = f"prompt {self.prompt_id} on {self._remote.base_url}"
        if isinstance(event, ExecutionFailed):
            node = f"node {event.node_id} ({event.node_type})"
            detail = f"{event.exception_type}: {event.exception_message}"
            return ComfyExecutionError(f"{where}: {node} raised {detail}")
        if self._cancel_requested:
            return self._cancelled()
        return InstanceUnavailable(
            f"{where} was interrupted by someone else at node {event.node_id}"
        )

    def _history_failure(self, entry: HistoryEntry) -> ConsumerError:
        event = entry.last_event
        if isinstance(event, ExecutionFailed | ExecutionInterrupted):
            return self._failure(event)
        where = f"prompt {self.prompt_id} on {self._remote.base_url}"
        return ComfyExecutionError(f"{where} ended with status {entry.status_str!r}")

    def _cancelled(self) -> TaskCancelled:
        return TaskCancelled(f"prompt {self.prompt_id} on {self._remote.base_url} was cancelled")

    def _time_node(self, node: str | None) -> None:
        """A node's time runs from its `executing` to the next one (or the prompt's end)."""
        now = time.monotonic()
        if self._current is not None:
            previous, since = self._current
            self.node_seconds[previous] = self.node_seconds.get(previous, 0.0) + now - since
        self._current = (node, now) if node is not None else None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _close(self) -> None:
        self._closed = True
        self._begun.set()  # nobody waits for a start that will not come
        self._notify()
