"""The settle point without a broker: every outcome, every failure of its steps, the mapping
to broker methods, cancellation and the deadline. Fake deliveries, the memory store."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from consumer.jobs import BatchRef, Reply
from consumer.metrics import Metrics
from consumer.reporter import Reporter
from consumer.settle import (
    Action,
    Crashed,
    Finished,
    Handled,
    Refused,
    Returned,
    Settler,
    apply,
    fallback,
    safe_text,
)
from consumer.state import MemoryTaskStore, TaskRecord, task_key
from contracts import ErrorCode, EventKind, TaskStatus
from contracts.models import TaskError, TaskEvent
from tests.fakes import FakeMessage, FakePublisher, broker_down

USER = "user_1"


def event(kind: EventKind, task_id: str, *, code: ErrorCode | None = None, **more) -> TaskEvent:
    now = datetime.now(UTC)
    status = {
        EventKind.COMPLETED: TaskStatus.COMPLETED,
        EventKind.FAILED: TaskStatus.FAILED,
        EventKind.CANCELLED: TaskStatus.CANCELLED,
    }[kind]
    error = TaskError(code=code, message="it broke", retriable=False) if code else None
    outputs = ["http://outputs.test/o.png"] if kind is EventKind.COMPLETED else None
    fields = {
        "output_image_url": outputs[0] if outputs else None,
        "output_image_urls": outputs,
        "event": kind,
        "event_id": uuid.uuid4().hex,
        "task_id": task_id,
        "user_id": USER,
        "style_type": "clay",
        "status": status,
        "progress": 100 if kind is EventKind.COMPLETED else 0,
        "attempt": 1,
        "error": error,
        "created_at": now,
        "timestamp": now,
    }
    return TaskEvent(**{**fields, **more})


def pending(task_id: str, **more) -> TaskRecord:
    return TaskRecord(task_id=task_id, user_id=USER, style_type="clay", **more)


@pytest.fixture
def store() -> MemoryTaskStore:
    return MemoryTaskStore(ttl_s=3600)


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


def make_settler(store: MemoryTaskStore, publisher: FakePublisher, deadline_s: float) -> Settler:
    metrics = Metrics()
    return Settler(
        store=store,
        reporter=Reporter(publisher, store, metrics, 0.5),  # type: ignore[arg-type]
        publisher=publisher,  # type: ignore[arg-type]
        metrics=metrics,
        deadline_s=deadline_s,
    )


@pytest.fixture
def settler(store: MemoryTaskStore, publisher: FakePublisher) -> Settler:
    return make_settler(store, publisher, deadline_s=5.0)


async def test_finished_records_publishes_replies_then_acks(store, publisher, settler):
    """A finished task: terminal record, event, reply, then every handle acked."""
    await store.create(pending("t1"))
    copies = [FakeMessage(), FakeMessage()]
    done = event(EventKind.COMPLETED, "t1")
    action = await settler.settle(
        copies, Finished(done, reply=Reply("amq.rabbitmq.reply-to", "c1"))
    )
    assert action is Action.ACK
    assert [m.settlements for m in copies] == [["ack"], ["ack"]]
    record = await store.get(task_key(USER, "t1"))
    assert record is not None
    assert record.status is TaskStatus.COMPLETED
    assert record.terminal_event is not None
    assert [e.event_id for e in publisher.events()] == [done.event_id]
    (reply,) = publisher.of_kind("reply")
    assert reply.headers == {"correlation_id": "c1"}


async def test_finished_publishes_the_ending_that_won(store, publisher, settler):
    """When another ending was stored first, that one is published, not ours."""
    await store.create(pending("t1"))
    first = event(EventKind.CANCELLED, "t1", code=ErrorCode.CANCELLED)
    await settler.settle([FakeMessage()], Finished(first))
    late = event(EventKind.COMPLETED, "t1")
    message = FakeMessage()
    await settler.settle([message], Finished(late))
    assert [e.event_id for e in publisher.events()] == [first.event_id, first.event_id]
    assert message.settlements == ["ack"]


async def test_finished_during_a_broker_outage_is_given_back_not_counted(store, publisher):
    """Publishing never confirms before the deadline: nack(requeue), not reject."""
    settler = make_settler(store, publisher, deadline_s=0.3)
    await store.create(pending("t1"))
    publisher.fail_with = broker_down()
    message = FakeMessage()
    assert (
        await settler.settle([message], Finished(event(EventKind.COMPLETED, "t1"))) is Action.RETURN
    )
    assert message.settlements == ["nack+requeue"]


async def test_finished_whose_bookkeeping_has_a_bug_is_requeued_and_counted(
    store, publisher, settler
):
    """A non-transient failure (a bug) ends as reject(requeue): the delivery limit applies."""
    await store.create(pending("t1"))
    publisher.fail_with = ValueError("a bug")
    message = FakeMessage()
    action = await settler.settle([message], Finished(event(EventKind.COMPLETED, "t1")))
    assert action is Action.REQUEUE_FAILED
    assert message.settlements == ["reject+requeue"]


async def test_refused_tells_the_sender_dead_letters_then_acks(store, publisher, settler):
    """Poison: a refusal record, the failed event, the dead letter with its reason, an ack."""
    failed = event(EventKind.FAILED, "bad-1", code=ErrorCode.INVALID_REQUEST)
    message = FakeMessage(body=b'{"nope": 1}')
    refused = Refused(ErrorCode.INVALID_REQUEST, "unknown field", event=failed)
    assert await settler.settle([message], refused) is Action.ACK
    assert message.settlements == ["ack"]
    (dead,) = publisher.of_kind("dead_letter")
    assert dead.headers["x-error-code"] == "invalid_request"
    assert publisher.events() == [failed]
    record = await store.get(task_key(USER, "bad-1"))
    assert record is not None
    assert record.status is TaskStatus.FAILED


async def test_refused_whose_dead_letter_fails_is_rejected_to_the_queues_dlx(publisher, settler):
    """If republishing the dead letter fails for a reason of its own, reject(requeue=False)."""
    publisher.fail_with = UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
    message = FakeMessage()
    action = await settler.settle([message], Refused(ErrorCode.INVALID_REQUEST, "bad"))
    assert action is Action.DEAD_LETTER
    assert message.settlements == ["reject"]


async def test_refused_during_a_broker_outage_is_given_back(store, publisher):
    """The dead-letter exchange cannot confirm: nack, and the refusal is decided again later."""
    settler = make_settler(store, publisher, deadline_s=0.3)
    publisher.fail_with = broker_down()
    message = FakeMessage()
    await settler.settle([message], Refused(ErrorCode.INVALID_REQUEST, "bad"))
    assert message.settlements == ["nack+requeue"]


async def test_refused_reason_with_a_lone_surrogate_is_escaped(publisher, settler):
    """A reason that cannot be encoded is escaped, never a crash in the error path."""
    message = FakeMessage()
    await settler.settle([message], Refused(ErrorCode.INVALID_REQUEST, "bad \ud800 text"))
    (dead,) = publisher.of_kind("dead_letter")
    assert dead.headers["x-error-message"] == "bad \\ud800 text"
    assert message.settlements == ["ack"]


async def test_crashed_on_the_last_delivery_tells_the_owner_then_requeues(
    store, publisher, settler
):
    """The last allowed delivery: the failed event goes out, then reject(requeue) (counted)."""
    await store.create(pending("t1"))
    failed = event(EventKind.FAILED, "t1", code=ErrorCode.INTERNAL_ERROR)
    message = FakeMessage()
    assert await settler.settle([message], Crashed("boom", event=failed)) is Action.REQUEUE_FAILED
    assert message.settlements == ["reject+requeue"]
    assert publisher.events() == [failed]


async def test_crashed_still_requeues_when_telling_fails(publisher, settler):
    """Telling the owner is best effort: the delivery is requeued whatever happens."""
    publisher.fail_with = ValueError("still broken")
    message = FakeMessage()
    failed = event(EventKind.FAILED, "t9", code=ErrorCode.INTERNAL_ERROR)
    await settler.settle([message], Crashed("boom", event=failed))
    assert message.settlements == ["reject+requeue"]


@pytest.mark.parametrize(
    ("outcome", "settlement"),
    [
        (Returned("shutdown"), "nack+requeue"),
        (Handled(), "ack"),
        (Crashed("bug"), "reject+requeue"),
    ],
)
async def test_plain_outcomes_end_on_their_method(settler, outcome, settlement):
    """Returned nacks, Handled acks, Crashed rejects with requeue."""
    message = FakeMessage()
    await settler.settle([message], outcome)
    assert message.settlements == [settlement]


@pytest.mark.parametrize(
    ("action", "settlement"),
    [
        (Action.ACK, "ack"),
        (Action.DEAD_LETTER, "reject"),
        (Action.REQUEUE_FAILED, "reject+requeue"),
        (Action.RETURN, "nack+requeue"),
    ],
)
async def test_each_action_uses_the_method_that_says_what_happened(action, settlement):
    """RabbitMQ 4.3 counts reject(requeue) toward the delivery limit, not nack(requeue)."""
    message = FakeMessage()
    assert await apply(message, action)
    assert message.settlements == [settlement]


def test_fallbacks_never_leave_a_delivery_unsettled():
    """Outages give the delivery back; a broken refusal goes to the DLX; the rest requeue."""
    finished = Finished(event(EventKind.COMPLETED, "t1"))
    refused = Refused(ErrorCode.INVALID_REQUEST, "bad")
    assert fallback(finished, outage=True) is Action.RETURN
    assert fallback(finished, outage=False) is Action.REQUEUE_FAILED
    assert fallback(refused, outage=True) is Action.RETURN
    assert fallback(refused, outage=False) is Action.DEAD_LETTER
    assert fallback(Crashed("x"), outage=True) is Action.REQUEUE_FAILED
    assert fallback(Returned("x"), outage=False) is Action.RETURN
    assert fallback(Handled(), outage=False) is Action.REQUEUE_FAILED


async def test_a_delivery_is_never_settled_twice(settler):
    """A handle settled already is left alone (aio-pika would raise)."""
    message = FakeMessage()
    await settler.settle([message], Handled())
    await settler.settle([message], Returned("again"))
    assert message.settlements == ["ack"]


async def test_a_closed_channel_does_not_break_the_settle(settler):
    """The channel is gone: nothing to do (the broker redelivers), and no exception."""
    message = FakeMessage(channel_gone=True)
    assert await settler.settle([message], Handled()) is Action.ACK
    assert not await apply(message, Action.ACK)


async def test_the_callers_cancellation_does_not_cut_a_settle_in_half(store, publisher, settler):
    """Cancelled while publishing, the settle still finishes: stored, published, acked."""
    await store.create(pending("t1"))
    publisher.hold = asyncio.Event()
    message = FakeMessage()
    caller = asyncio.create_task(
        settler.settle([message], Finished(event(EventKind.COMPLETED, "t1")))
    )
    await asyncio.sleep(0)  # let the settle start
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    publisher.hold.set()
    async with asyncio.timeout(5):
        await settler.close()
    assert message.settlements == ["ack"]
    assert len(publisher.events()) == 1


async def test_a_settle_that_hangs_ends_at_its_deadline(store, publisher):
    """A publish that never returns: the deadline gives the delivery back."""
    settler = make_settler(store, publisher, deadline_s=0.2)
    await store.create(pending("t1"))
    publisher.hold = asyncio.Event()  # never set
    message = FakeMessage()
    async with asyncio.timeout(5):
        action = await settler.settle([message], Finished(event(EventKind.COMPLETED, "t1")))
    assert action is Action.RETURN
    assert message.settlements == ["nack+requeue"]


async def test_batch_completed_is_announced_exactly_once(store, publisher, settler):
    """Ten tasks of a batch ending at once: one batch.completed, counting every ending."""
    size = 10
    for index in range(size):
        await store.create(pending(f"b1-{index}", batch_id="b1", batch_index=index))
    endings = [
        Finished(
            event(EventKind.COMPLETED, f"b1-{index}", batch_id="b1", batch_index=index),
            batch=BatchRef("b1", index, size),
        )
        for index in range(size)
    ]
    await asyncio.gather(*(settler.settle([FakeMessage()], e) for e in endings))
    (done,) = publisher.events("batch.completed")
    assert done.completed == size
    assert done.task_ids == [f"b1-{i}" for i in range(size)]


def test_safe_text_escapes_lone_surrogates_and_shortens():
    """Text for headers and events is always encodable and bounded."""
    assert safe_text("a\ud800b") == "a\\ud800b"
    assert len(safe_text("x" * 5000, 100)) == 100
