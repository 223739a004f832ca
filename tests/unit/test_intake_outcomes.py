"""Intake and dispatcher decide, the settle point ends: every path of a delivery, without a
broker (fake deliveries, a fake pipeline, the memory store)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from consumer.errors import ImageInvalid
from consumer.events import APP_ID
from consumer.state import task_key
from contracts import TaskStatus
from tests.fakes import FakeMessage
from tests.world import intake_world

USER = "user_1"


def request(task_id: str = "t-1", **fields: Any) -> dict[str, Any]:
    body = {
        "task_id": task_id,
        "user_id": USER,
        "image_url": "https://photos.example.com/a.jpg",
        "style_type": "clay",
    }
    return {**body, **fields}


def message(body: dict[str, Any] | bytes, **props: Any) -> FakeMessage:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return FakeMessage(body=raw, **props)


def cancel(**fields: Any) -> FakeMessage:
    return message({"user_id": USER, **fields}, routing_key="cancel")


async def test_a_valid_request_runs_and_is_acked_after_its_event():
    """accepted, completed, then the ack."""
    async with intake_world() as world:
        delivery = message(request())
        await world.deliver(delivery)
        assert delivery.settlements == ["ack"]
        assert [e.event for e in world.events()] == ["accepted", "completed"]


async def test_a_failing_task_ends_failed_and_acked():
    """A permanent pipeline error: a `failed` event with its code, then the ack."""
    async with intake_world() as world:
        world.pipeline.fail_with = ImageInvalid("not an image")
        delivery = message(request())
        await world.deliver(delivery)
        assert delivery.settlements == ["ack"]
        assert world.events("failed")[0].error.code == "image_invalid"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"user_id": "user_1", "custom_prompt": "\\ud800", "task_id": "x"}', "surrogate"),
        (b'{"user_id": "user_1", "\\udfff": 1}', "surrogate"),
        (b"[" * 1500 + b"]" * 1500, "nested"),
        (b'{"user_id": "user_1", "meta": ' + b'{"a": ' * 1500 + b"1" + b"}" * 1501, "nested"),
        (b'{"user_id": "user_1", "strength": 1e999}', "out of range"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
async def test_hostile_bodies_are_refused_with_a_reason(body: bytes, needle: str):
    """Lone surrogates, deep nesting, huge numbers, bad UTF-8: dead-lettered, never a crash."""
    async with intake_world() as world:
        delivery = message(body)
        await world.deliver(delivery)
        assert delivery.settlements == ["ack"]
        (dead,) = world.publisher.of_kind("dead_letter")
        assert dead.headers["x-error-code"] == "invalid_request"
        assert needle in dead.headers["x-error-message"]


async def test_a_surrogate_refusal_tells_its_sender():
    """The sender is known: a `failed` event (invalid_request) goes to task.failed.<user>."""
    async with intake_world() as world:
        await world.deliver(message(b'{"user_id": "user_1", "custom_prompt": "\\ud800"}'))
        (failed,) = world.events("failed")
        assert failed.user_id == USER
        assert failed.error.code == "invalid_request"


@pytest.mark.parametrize(
    ("props", "needle"),
    [
        ({"content_type": "text/plain"}, "content_type"),
        ({"content_encoding": "gzip"}, "content_encoding"),
        ({"content_type": "application/x-\udcff"}, "content_type"),
    ],
)
async def test_unsupported_properties_are_refused(props: dict[str, Any], needle: str):
    """content_type and content_encoding are the sender's: anything but plain JSON is refused."""
    async with intake_world() as world:
        delivery = message(request(), **props)
        await world.deliver(delivery)
        (dead,) = world.publisher.of_kind("dead_letter")
        assert needle in dead.headers["x-error-message"]
        assert delivery.settlements == ["ack"]


async def test_an_invalid_message_id_is_not_a_task_id():
    """Without a task_id, a message_id that is not a valid id is ignored (a fresh id is used)."""
    async with intake_world() as world:
        body = request()
        del body["task_id"]
        delivery = message(body, message_id="../../etc/passwd \u2603")
        await world.deliver(delivery)
        (done,) = world.events("completed")
        assert done.task_id != delivery.message_id
        assert delivery.settlements == ["ack"]


async def test_a_valid_message_id_is_the_task_id():
    """Without a task_id, a valid message_id names the task (the documented fallback)."""
    async with intake_world() as world:
        body = request()
        del body["task_id"]
        await world.deliver(message(body, message_id="order-7"))
        assert world.events("completed")[0].task_id == "order-7"


async def test_forged_batch_headers_from_outside_are_ignored():
    """x-batch-* on a message we did not publish: a plain task, no batch.completed."""
    async with intake_world() as world:
        headers = {"x-batch-id": "b1", "x-batch-index": 0, "x-batch-size": 1}
        await world.deliver(message(request("b1-0"), headers=headers))
        assert world.events("completed")[0].batch_id is None
        assert world.events("batch.completed") == []


async def test_forged_batch_headers_naming_another_users_batch_are_ignored():
    """Even with our app_id, a batch owned by another user is not announced to the forger."""
    async with intake_world() as world:
        victim = {"user_id": "victim", "style_type": "clay"}
        urls = ["https://photos.example.com/a.jpg"]
        await world.deliver(
            message({**victim, "batch_id": "vb", "image_urls": urls}, routing_key="transform.batch")
        )
        headers = {"x-batch-id": "vb", "x-batch-index": 0, "x-batch-size": 1}
        forged = message(request("mine-0"), headers=headers, app_id=APP_ID)
        await world.deliver(forged)
        assert world.events("batch.completed") == []
        assert world.events("completed")[0].batch_id is None


@pytest.mark.parametrize(
    "headers",
    [
        {"x-batch-id": "b", "x-batch-index": True, "x-batch-size": 2},
        {"x-batch-id": "b", "x-batch-index": 5, "x-batch-size": 2},
        {"x-batch-id": "b", "x-batch-index": -1, "x-batch-size": 2},
        {"x-batch-id": "b" * 300, "x-batch-index": 0, "x-batch-size": 2},
        {"x-batch-id": "b", "x-batch-index": 0, "x-batch-size": 10**9},
        {"x-batch-id": b"\xff", "x-batch-index": "0", "x-batch-size": None},
    ],
)
async def test_malformed_batch_headers_never_crash(headers: dict[str, Any]):
    """Wrong types and ranges in x-batch-*: ignored, the task runs."""
    async with intake_world() as world:
        delivery = message(request("b-0"), headers=headers, app_id=APP_ID)
        await world.deliver(delivery)
        assert delivery.settlements == ["ack"]


async def test_a_batch_we_expanded_is_announced_once():
    """Our own expansion: its tasks carry trusted headers and one batch.completed goes out."""
    async with intake_world() as world:
        urls = [f"https://photos.example.com/{i}.jpg" for i in range(3)]
        body = {"user_id": USER, "style_type": "clay", "batch_id": "b7", "image_urls": urls}
        await world.deliver(message(body, routing_key="transform.batch"))
        for published in world.publisher.of_kind("request"):
            expanded = message(published.body, headers=published.headers, app_id=APP_ID)
            await world.deliver(expanded)
        (done,) = world.events("batch.completed")
        assert done.completed == 3


async def test_reply_to_is_ignored_unless_allowed():
    """An arbitrary queue is refused (metric); Direct Reply-to is honoured."""
    async with intake_world() as world:
        await world.deliver(message(request("t-1"), reply_to="other-app.orders"))
        await world.deliver(
            message(request("t-2"), reply_to="amq.rabbitmq.reply-to.g1h2AA", correlation_id="c")
        )
        (reply,) = world.publisher.of_kind("reply")
        assert reply.routing_key == "amq.rabbitmq.reply-to.g1h2AA"
        assert world.metrics.replies_refused._value.get() == 1


async def test_reply_to_matching_the_configured_pattern_is_honoured():
    """REPLY_TO_PATTERN lets an operator allow their own reply queues."""
    async with intake_world(reply_to_pattern=r"replies\.[a-z]+") as world:
        await world.deliver(message(request(), reply_to="replies.orders"))
        assert [r.routing_key for r in world.publisher.of_kind("reply")] == ["replies.orders"]


async def test_a_cancel_for_an_unseen_id_squats_nothing():
    """Another user's early cancel neither creates a record nor blocks the owner's request."""
    async with intake_world() as world:
        await world.cancel(message({"user_id": "mallory", "task_id": "t-1"}, routing_key="cancel"))
        assert await world.store.find("t-1") == []
        delivery = message(request("t-1"))
        await world.deliver(delivery)
        assert [e.event for e in world.events()] == ["accepted", "completed"]


async def test_the_owners_early_cancel_cancels_the_task_when_it_arrives():
    """The owner cancelled before the request arrived: it ends cancelled, never runs."""
    async with intake_world() as world:
        await world.cancel(cancel(task_id="t-1"))
        await world.deliver(message(request("t-1")))
        assert [e.event for e in world.events()] == ["cancelled"]
        assert world.pipeline.runs == []


async def test_a_cancel_reaches_a_running_task():
    """Cancelled while running: `cancelled`, acked."""
    async with intake_world() as world:
        delivery = message(request("t-1"))
        await world.deliver_held(delivery)
        await world.cancel(cancel(task_id="t-1"))
        async with asyncio.timeout(5):
            await delivery.settled.wait()
        assert delivery.settlements == ["ack"]
        assert world.events()[-1].event == "cancelled"


async def test_shutdown_gives_running_deliveries_back_with_nack():
    """Past the grace period a running task is interrupted and its delivery nacked."""
    async with intake_world() as world:
        delivery = message(request("t-1"))
        await world.deliver_held(delivery)
        await world.dispatcher.drain(0.01)
        assert delivery.settlements == ["nack+requeue"]
        record = await world.store.get(task_key(USER, "t-1"))
        assert record is not None
        assert not record.status.is_terminal


async def test_a_crash_is_requeued_and_counted_then_announced_on_the_last_delivery():
    """A bug: reject(requeue) each time; on the last allowed delivery `failed` goes out first."""
    async with intake_world(delivery_limit=2) as world:
        world.pipeline.fail_with = RuntimeError("a bug")
        first = message(request("t-1"))
        await world.deliver(first)
        assert first.settlements == ["reject+requeue"]
        assert world.events("failed") == []
        last = message(request("t-1"), headers={"x-delivery-count": 2})
        await world.deliver(last)
        assert last.settlements == ["reject+requeue"]
        assert world.events("failed")[0].error.code == "internal_error"


async def test_a_redelivered_copy_attaches_and_both_are_acked():
    """A copy delivered while the task runs attaches to it; both end when it ends."""
    async with intake_world() as world:
        first, copy = message(request("t-1")), message(request("t-1"))
        await world.deliver_held(first)
        await world.deliver(copy, settled=False)
        world.pipeline.hold.set()  # type: ignore[union-attr]
        async with asyncio.timeout(5):
            await asyncio.gather(first.settled.wait(), copy.settled.wait())
        assert first.settlements == copy.settlements == ["ack"]
        assert world.pipeline.runs == ["t-1"]


async def test_an_ended_task_delivered_again_is_answered_from_the_store():
    """The same terminal event (same event_id) is published again, then the copy is acked."""
    async with intake_world() as world:
        await world.deliver(message(request("t-1")))
        again = message(request("t-1"))
        await world.deliver(again)
        first, second = world.events("completed")
        assert first.event_id == second.event_id
        assert again.settlements == ["ack"]
        assert world.pipeline.runs == ["t-1"]


async def test_two_users_may_use_the_same_task_id():
    """Task ids are scoped by user: another user's request for the same id runs on its own."""
    async with intake_world() as world:
        await world.deliver(message(request("t-1")))
        await world.deliver(message(request("t-1", user_id="mallory")))
        assert world.publisher.of_kind("dead_letter") == []
        done = world.events("completed")
        assert sorted(e.user_id for e in done) == ["mallory", USER]
        assert world.pipeline.runs == ["t-1", "t-1"]
        for user in (USER, "mallory"):
            record = await world.store.get(task_key(user, "t-1"))
            assert record is not None
            assert record.status is TaskStatus.COMPLETED


async def test_a_refused_request_squats_no_id():
    """A refused request naming another user's id leaves that user's task untouched."""
    async with intake_world() as world:
        await world.deliver(message(request("t-1", user_id="mallory", style_type="nope")))
        delivery = message(request("t-1"))
        await world.deliver(delivery)
        assert [e.user_id for e in world.events("completed")] == [USER]
        assert delivery.settlements == ["ack"]
