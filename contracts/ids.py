"""Identifier patterns and AMQP routing keys.

Every pattern here is anchored and written in the common subset of ECMAScript, Python and
Rust regular expressions, so the JSON Schema files state exactly what the models check.
"""

from __future__ import annotations

import re
from functools import cache

MAX_ID_CHARS = 64
MAX_BATCH_SIZE = 50
# A batch's tasks are named "{batch_id}-{index}": four characters are left for "-49".
MAX_BATCH_ID_CHARS = MAX_ID_CHARS - 4
MAX_ROUTING_KEY_BYTES = 255

ID_PATTERN = rf"^[A-Za-z0-9_.:-]{{1,{MAX_ID_CHARS}}}$"
"""task_id and event_id: letters, digits and `_ . : -`."""
BATCH_ID_PATTERN = rf"^[A-Za-z0-9_.:-]{{1,{MAX_BATCH_ID_CHARS}}}$"
"""batch_id: like a task_id, shorter so that "{batch_id}-{index}" is a valid task_id."""
USER_ID_PATTERN = rf"^[A-Za-z0-9_-]{{1,{MAX_ID_CHARS}}}$"
"""user_id: no dots, because it is a word of the event routing keys."""
STYLE_TYPE_PATTERN = r"^[a-z0-9_]{1,64}$"
"""style_type: the name of a style in the service's catalog."""

_FORBIDDEN_WORD_CHARS = frozenset(".*#")


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def is_valid_id(value: object, pattern: str = ID_PATTERN) -> bool:
    """Whether `value` is a string matching `pattern` (by default a task_id)."""
    return isinstance(value, str) and _compiled(pattern).fullmatch(value) is not None


def batch_task_id(batch_id: str, index: int) -> str:
    """The task_id of image `index` (0-based) of a batch."""
    if not 0 <= index < MAX_BATCH_SIZE:
        raise ValueError(f"batch index {index} is outside 0..{MAX_BATCH_SIZE - 1}")
    return f"{batch_id}-{index}"


def routing_key(*words: str) -> str:
    """Join words into an AMQP topic routing key, refusing words that would change its shape.

    A word may not be empty nor contain `.`, `*` or `#`; the key may not exceed 255 bytes.
    """
    if not words:
        raise ValueError("a routing key needs at least one word")
    for word in words:
        _check_word(word)
    key = ".".join(words)
    size_bytes = len(key.encode())
    if size_bytes > MAX_ROUTING_KEY_BYTES:
        raise ValueError(
            f"routing key is {size_bytes} bytes, over the AMQP limit of {MAX_ROUTING_KEY_BYTES}"
        )
    return key


def _check_word(word: str) -> None:
    if not word:
        raise ValueError("routing key words may not be empty")
    bad = sorted(_FORBIDDEN_WORD_CHARS.intersection(word))
    if bad:
        raise ValueError(f"routing key word {word!r} contains {' '.join(bad)}")


def task_event_routing_key(event: str, user_id: str) -> str:
    """`task.<event>.<user_id>`, the routing key of a TaskEvent on the events exchange."""
    return routing_key("task", event, user_id)


def batch_completed_routing_key(user_id: str) -> str:
    """`batch.completed.<user_id>`, the routing key of a BatchCompletedEvent."""
    return routing_key("batch", "completed", user_id)
