"""Every field of a request message as an attacker (or a careless client) would write it, against
a live replica: body, properties and our own `x-` headers. Each case ends, within seconds,
with a `failed` event and/or a dead letter carrying a stable code, or with a task that ignored
the field; the replica keeps consuming (good tasks published afterwards complete), and the
final check finds nothing lost, nothing left in the work queue, and exactly the poison in
the dead-letter queue."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web

from consumer.events import APP_ID
from consumer.testing.comfyui_emulator import Faults
from tests.hostile.cases import Cases, Expect

STEADY = Faults(step_seconds=0.01)
HOSTILE_HOST = "127.0.0.2"  # the one "public" host the replica trusts; loopback is not


def body(run, index: int, **fields: Any) -> tuple[str, bytes]:
    request = run.request(index, **fields)
    return request["task_id"], orjson.dumps(request)


def raw(text: str) -> bytes:
    return text.encode()


async def test_hostile_bodies(hostile_run, hostile_rows):
    """Lone surrogates, deep nesting, bad UTF-8, huge numbers, wrong shapes: refused with
    invalid_request (a failed event when the sender is known), never a crash or a stall."""
    async with hostile_run(faults=STEADY) as run:
        await run.spawn(1)
        cases = Cases(run, hostile_rows)
        task_id = f"{run.config.prefix}-s1"
        prompt = raw(
            f'{{"task_id": "{task_id}", "user_id": "fault_user", "style_type": "clay",'
            f' "image_url": "{run.photos.url("photo.jpg")}", "custom_prompt": "cut \\ud83d"}}'
        )
        failed = Expect(task_id, "failed:invalid_request", "invalid_request")
        await cases.check("lone surrogate in a value", "body.custom_prompt", prompt, failed)
        key_id = f"{run.config.prefix}-s2"
        key = raw(f'{{"task_id": "{key_id}", "user_id": "fault_user", "\\udfff": 1}}')
        await cases.check(
            "lone surrogate in a key",
            "body (key)",
            key,
            Expect(key_id, "failed:invalid_request", "invalid_request"),
        )
        deep = b"[" * 1500 + b"]" * 1500
        await cases.check("JSON nested 1500 deep", "body", deep, Expect(dead="invalid_request"))
        meta_id = f"{run.config.prefix}-s3"
        nested = raw(f'{{"task_id": "{meta_id}", "user_id": "fault_user", "metadata": ')
        nested += b'{"a": ' * 1500 + b"1" + b"}" * 1501
        await cases.check(
            "nested metadata", "body.metadata", nested, Expect(dead="invalid_request")
        )
        await cases.check("not UTF-8", "body", b"\xff\xfe{}", Expect(dead="invalid_request"))
        big_id, big = body(run, 4, strength=1)
        big = big.replace(b'"strength":1', b'"strength":1e999')
        await cases.check(
            "number out of range",
            "body.strength",
            big,
            Expect(big_id, "failed:invalid_request", "invalid_request"),
        )
        huge_int_id, huge_int = body(run, 5)
        huge_int = huge_int.replace(b"}", b',"seed":' + b"9" * 5000 + b"}")
        await cases.check(
            "5000-digit integer",
            "body.seed",
            huge_int,
            Expect(huge_int_id, "failed:invalid_request", "invalid_request"),
        )
        await run.publish_tasks(3)  # still consuming
        await run.finish()
    assert not cases.failures, cases.failures


async def test_hostile_properties(hostile_run, hostile_rows, amqp_url):
    """message_id, content_type, content_encoding, reply_to and correlation_id are the
    sender's: bad ones are refused or ignored, and reply_to never reaches a foreign queue."""
    async with hostile_run(faults=STEADY) as run:
        await run.spawn(1)
        cases = Cases(run, hostile_rows)
        victim = await run.channel.declare_queue(f"{run.config.prefix}-victim", auto_delete=True)
        request = run.request(10, metadata={"case": "message_id"})
        del request["task_id"]
        done = await cases.check_matching(
            "invalid message_id as task id",
            "message_id",
            orjson.dumps(request),
            lambda e: (e.get("metadata") or {}).get("case") == "message_id",
            "completed",
            message_id="../../x \u2603 not an id",
        )
        assert done["task_id"] != "../../x \u2603 not an id"
        ctype_id, ctype = body(run, 11)
        await cases.check(
            "wrong content_type",
            "content_type",
            ctype,
            Expect(ctype_id, "failed:invalid_request", "invalid_request"),
            content_type="text/html",
        )
        enc_id, enc = body(run, 12)
        await cases.check(
            "compressed content_encoding",
            "content_encoding",
            enc,
            Expect(enc_id, "failed:invalid_request", "invalid_request"),
            content_encoding="gzip",
        )
        reply_id, reply = body(run, 13)
        await cases.check(
            "reply_to names another app's queue",
            "reply_to",
            reply,
            Expect(reply_id, "completed"),
            reply_to=victim.name,
            correlation_id="\u2603" * 60,
        )
        await run.publish_tasks(3)
        await run.finish()
        victim_depth = await run.queue_depth(victim.name)
    assert victim_depth == 0, "a terminal event was injected into a foreign queue"
    assert not cases.failures, cases.failures


async def test_hostile_headers_and_ids(hostile_run, hostile_rows):
    """Forged x-batch-* (even with our app_id, naming another user's batch), an offset that
    would resume another user's batch, forged x-error-* on poison, malformed header types,
    and cancels for ids never seen: none takes effect."""
    async with hostile_run(faults=STEADY) as run:
        await run.spawn(1)
        cases = Cases(run, hostile_rows)
        batch_id = f"{run.config.prefix}-vb"
        victim = {
            "user_id": "victim",
            "style_type": "clay",
            "batch_id": batch_id,
            "image_urls": [run.photos.url("photo.jpg")],
        }
        await run.publish(orjson.dumps(victim), "transform.batch")
        await run.events.wait_for(lambda e: e.get("event") == "batch.completed", 20)
        run.task_ids.append(f"{batch_id}-0")
        run.owners[f"{batch_id}-0"] = "victim"
        forged_id, forged = body(run, 20)
        headers = {"x-batch-id": batch_id, "x-batch-index": 0, "x-batch-size": 1}
        event = await cases.check(
            "x-batch-* naming another user's batch",
            "headers x-batch-*",
            forged,
            Expect(forged_id, "completed"),
            headers=headers,
            app_id=APP_ID,
        )
        assert event is not None
        assert event["batch_id"] is None
        rest = {**victim, "user_id": "mallory", "image_urls": victim["image_urls"] * 2}
        run.owners[f"{batch_id}-1"] = "mallory"
        await cases.check(
            "x-batch-offset resuming another user's batch",
            "headers x-batch-offset",
            orjson.dumps(rest),
            Expect(f"{batch_id}-1", "completed"),
            routing_key="transform.batch.bulk",
            headers={"x-batch-offset": 1},
            app_id=APP_ID,
        )
        mallory_batch = await run.events.wait_for(
            lambda e: e.get("event") == "batch.completed" and e.get("user_id") == "mallory", 20
        )
        assert mallory_batch["completed"] == 2  # the offset was ignored: fed from its start
        odd_id, odd = body(run, 21)
        odd_headers = {"x-batch-id": ["x"], "x-batch-index": 1.5, "x-batch-size": True}
        await cases.check(
            "malformed x-batch-* types",
            "headers x-batch-*",
            odd,
            Expect(odd_id, "completed"),
            headers=odd_headers,
        )
        poison_id, poison = body(run, 22, colour="blue")
        lying = {"x-error-code": "none", "x-original-routing-key": "admin"}
        await cases.check(
            "forged x-error-* on poison",
            "headers x-error-*",
            poison,
            Expect(poison_id, "failed:invalid_request", "invalid_request"),
            headers=lying,
        )
        squatted = f"{run.config.prefix}-sq"
        cancel = {"user_id": "mallory", "task_id": squatted}
        await run.publish(orjson.dumps(cancel), "cancel")
        own_id, own = body(run, 23, task_id=squatted)
        await cases.check(
            "another user's early cancel (squat)",
            "cancel.task_id",
            own,
            Expect(own_id, "completed"),
        )
        await run.publish_tasks(3)
        await run.finish()
    batch_events = [e for e in run.events.events if e.get("event") == "batch.completed"]
    assert sorted(e["user_id"] for e in batch_events) == ["mallory", "victim"]
    assert not cases.failures, cases.failures


@asynccontextmanager
async def redirecting_upload_host(target: str) -> AsyncIterator[str]:
    """A "public" host whose upload URL redirects (307) to `target`."""

    async def put(_: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target)

    app = web.Application()
    app.router.add_put("/upload/{name}", put)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOSTILE_HOST, 0).start()
    try:
        yield f"http://{HOSTILE_HOST}:{runner.addresses[0][1]}/upload/out.png"
    finally:
        await runner.cleanup()


async def test_hostile_upload_url(hostile_run, hostile_rows):
    """An upload URL that redirects into the private network: output_upload_failed, and the
    internal server never sees the PUT nor leaks its body."""
    hits: list[str] = []

    async def internal(request: web.Request) -> web.Response:
        hits.append(request.method)
        return web.Response(status=500, text="internal-secret-7f3a")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", internal)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "::1", 0).start()
    internal_url = f"http://[::1]:{runner.addresses[0][1]}/admin"
    try:
        async with (
            redirecting_upload_host(internal_url) as upload_url,
            hostile_run(
                faults=STEADY, env={"IMAGE_URL_ALLOWED_HOSTS": f"127.0.0.1,{HOSTILE_HOST}"}
            ) as run,
        ):
            await run.spawn(1)
            cases = Cases(run, hostile_rows)
            up_id, up = body(run, 30, output={"upload_url": upload_url})
            event = await cases.check(
                "upload_url redirects to loopback",
                "body.output.upload_url",
                up,
                Expect(up_id, "failed:output_upload_failed"),
            )
            await run.publish_tasks(2)
            await run.finish()
    finally:
        await runner.cleanup()
    assert not cases.failures, cases.failures
    assert hits == [], "the redirect target was contacted"
    assert event is not None
    assert "internal-secret" not in orjson.dumps(event).decode()
