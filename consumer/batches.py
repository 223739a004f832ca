"""Batches become tasks: all at once, or a slice at a time so that users' batches interleave.

A bulk batch (the default) is fed to the bulk queue in slices of SCHEDULER_BATCH_SLICE
tasks. After each slice the rest of the batch goes back to the same queue, behind it, as a
`transform.batch.bulk` message whose `x-batch-offset` header says where to go on. The
queue itself then takes turns: with two users' batches in it, their slices alternate, and
a batch published later starts within one slice of every batch ahead of it, not after
them. Nothing is held meanwhile (the rest of a batch is a message in a durable queue), and
a crash between publishing a slice and acking re-publishes tasks the store then answers
by their ids.

An interactive batch, or any batch under `SCHEDULER=fifo`, is expanded at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from consumer import records
from consumer.broker import header_int
from consumer.events import APP_ID, until_confirmed
from consumer.logs import ctx
from consumer.topology import BULK_BATCH_KEY, BULK_KEY, INTERACTIVE_KEY
from contracts.ids import MAX_BATCH_SIZE, batch_task_id
from contracts.models import BatchTransformRequest, TransformRequest

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

    from consumer.events import EventPublisher
    from consumer.jobs import Reply
    from consumer.state import TaskStateStore

log = logging.getLogger(__name__)
OFFSET_HEADER = "x-batch-offset"


class BatchFeeder:
    """Turns a batch request (or the rest of one) into task requests on the right queue."""

    def __init__(
        self,
        *,
        publisher: EventPublisher,
        store: TaskStateStore,
        slice_size: int | None,
        on_bulk_published: Callable[[], None],
    ) -> None:
        """`slice_size` None: expand every batch at once (the fifo scheduler)."""
        self._publisher = publisher
        self._store = store
        self._slice = slice_size
        self._on_bulk_published = on_bulk_published

    def __repr__(self) -> str:
        return f"<BatchFeeder slice={self._slice}>"

    async def feed(
        self,
        message: AbstractIncomingMessage,
        batch: BatchTransformRequest,
        batch_id: str,
        reply: Reply | None,
    ) -> None:
        """Publish the batch's next tasks (with confirms), then the rest of it if any."""
        offset = await self._offset(message, batch, batch_id)
        if offset == 0:
            await records.register_batch(self._store, batch_id, batch)
        size = len(batch.image_urls)
        slice_size = self._slice if batch.priority != "interactive" else None
        key = BULK_KEY if slice_size else INTERACTIVE_KEY
        end = min(size, offset + slice_size) if slice_size else size
        fields = batch.model_dump(exclude={"batch_id", "image_urls"}, exclude_none=True)
        for index in range(offset, end):
            request = TransformRequest(
                task_id=batch_task_id(batch_id, index), image_url=batch.image_urls[index], **fields
            )
            headers = {"x-batch-id": batch_id, "x-batch-index": index, "x-batch-size": size}
            body = request.model_dump_json(exclude_none=True).encode()
            await self._publish(key, body, headers, reply)
        if end < size:
            rest = batch.model_copy(update={"batch_id": batch_id})
            body = rest.model_dump_json(exclude_none=True).encode()
            await self._publish(BULK_BATCH_KEY, body, {OFFSET_HEADER: end}, reply)
        if slice_size:
            self._on_bulk_published()
        log.info(
            "batch fed",
            extra=ctx(
                batch_id=batch_id, user_id=batch.user_id, tasks=f"{offset}..{end - 1}/{size}"
            ),
        )

    async def _offset(
        self, message: AbstractIncomingMessage, batch: BatchTransformRequest, batch_id: str
    ) -> int:
        """Where to go on: the offset header counts only on the rest of a batch we published
        and registered for this same owner; anything else starts from the beginning."""
        offset = header_int(message, OFFSET_HEADER)
        if offset is None or message.app_id != APP_ID:
            return 0
        if not 0 < offset < len(batch.image_urls) <= MAX_BATCH_SIZE:
            return 0
        if not await records.batch_registered(self._store, batch.user_id, batch_id):
            return 0
        return offset

    async def _publish(
        self, key: str, body: bytes, headers: dict[str, Any], reply: Reply | None
    ) -> None:
        publish = functools.partial(
            self._publisher.publish_request,
            key,
            body,
            headers=headers,
            reply_to=reply.reply_to if reply else None,
            correlation_id=reply.correlation_id if reply else None,
        )
        await until_confirmed(publish)
