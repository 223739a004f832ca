"""Identifier patterns and routing keys."""

from __future__ import annotations

import pytest

from contracts.ids import (
    BATCH_ID_PATTERN,
    ID_PATTERN,
    MAX_BATCH_SIZE,
    USER_ID_PATTERN,
    batch_completed_routing_key,
    batch_task_id,
    is_valid_id,
    routing_key,
    task_event_routing_key,
)


@pytest.mark.parametrize("value", ["a", "order-1001", "x.y:z_1", "A" * 64])
def test_task_ids_accepted(value):
    """Letters, digits and _ . : - up to 64 characters make a task_id."""
    assert is_valid_id(value)


@pytest.mark.parametrize("value", ["", "A" * 65, "a b", "a/b", "é", "a\n", 7, None])
def test_task_ids_refused(value):
    """Empty, too long, other characters, a trailing newline or a non-string are refused."""
    assert not is_valid_id(value)


def test_user_ids_have_no_dots():
    """A user_id is a routing key word, so it may not contain a dot."""
    assert is_valid_id("user-42_b", USER_ID_PATTERN)
    assert not is_valid_id("user.42", USER_ID_PATTERN)


def test_batch_task_ids_are_valid_task_ids():
    """The longest batch_id with the highest index still makes a valid task_id."""
    batch_id = "b" * 60
    assert is_valid_id(batch_id, BATCH_ID_PATTERN)
    assert not is_valid_id(batch_id + "b", BATCH_ID_PATTERN)
    assert is_valid_id(batch_task_id(batch_id, MAX_BATCH_SIZE - 1), ID_PATTERN)


@pytest.mark.parametrize("index", [-1, MAX_BATCH_SIZE])
def test_batch_task_id_refuses_indexes_out_of_range(index):
    """A batch index outside 0..49 is a programming error."""
    with pytest.raises(ValueError, match=r"outside 0\.\.49"):
        batch_task_id("b", index)


def test_routing_key_joins_words():
    """Words are joined with dots; event keys follow task.<event>.<user_id>."""
    assert routing_key("a", "b") == "a.b"
    assert task_event_routing_key("started", "user-42") == "task.started.user-42"
    assert batch_completed_routing_key("u1") == "batch.completed.u1"


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ((), "at least one word"),
        (("task", ""), "may not be empty"),
        (("task", "a.b"), r"contains \."),
        (("task", "*"), r"contains \*"),
        (("task", "#"), "contains #"),
        (("é" * 128,), "256 bytes"),
    ],
)
def test_routing_key_refuses_bad_words(words, message):
    """Empty words, wildcard or separator characters and keys over 255 bytes are refused."""
    with pytest.raises(ValueError, match=message):
        routing_key(*words)


def test_routing_key_of_255_bytes_is_accepted():
    """The AMQP limit itself is allowed."""
    assert len(routing_key("a" * 127, "b" * 127)) == 255
