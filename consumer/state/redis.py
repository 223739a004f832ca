"""A TaskStateStore in Redis, shared by every replica.

Keys, all under `key_prefix`; a record's <key> is `task_key(user_id, task_id)`, i.e.
<user_id>/<task_id>, and the indexes hold those keys, not bare task ids:

    task:<key>          the record's JSON; expires ttl_s after creation (updates keep the TTL)
    user:<user_id>      sorted set of the user's record keys, scored by created_at (list_for_user)
    ids:<task_id>       sorted set of the keys of every user's record with that task id,
                        scored by created_at (find)
    status:<status>     sorted set of record keys per status (counts)
    style:<style>       sorted set of record keys per style (counts); `styles` lists the styles
    lease:<key>         the lease owner, with a PX expiry
    cancels:<user_id>   sorted set of task ids the user cancelled before they were seen,
                        scored by time; trimmed to MAX_CANCELS_PER_USER and to ttl_s
    batch:<batch_id>    set of the batch's ended task ids; expires ttl_s after the first
    batch-claim:<id>    who may announce the batch: SET NX PX claim_ttl_s, then ttl_s once sent

A batch id is whatever the caller passes (a per-user key, "/" and all).

Index entries older than ttl_s are trimmed whenever an index is written or counted, and every
index key expires when nothing was written to it for ttl_s. Every multi-key write is one Lua
script: create is SET NX PX plus the indexes; update reads, applies `apply_changes` in Python,
then compare-and-swaps (reading again when another write came between). Leases are SET NX PX
plus owner-checked renew/release, also in Lua. So are the early cancel (ZADD and both trims)
and the batch end (SADD, SCARD, then the claim), which is what makes one announcer win.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from consumer.state import MAX_CANCELS_PER_USER, TaskCounts, TaskRecord, apply_changes, utcnow
from contracts.enums import TaskStatus

MAX_SWAP_TRIES = 50

# Lua keeps every multi-key write atomic. `add` puts a record key in a sorted-set index scored
# by created_at, trims entries past the TTL and keeps the index key alive for another TTL.
_ADD = """
local function add(index, key, score, cutoff, ttl_ms)
  redis.call('ZADD', index, score, key)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', cutoff)
  redis.call('PEXPIRE', index, ttl_ms)
end
local function add_style(index, styles, style, key, score, cutoff, ttl_ms)
  if style == '' then return end
  add(index, key, score, cutoff, ttl_ms)
  redis.call('SADD', styles, style)
  redis.call('PEXPIRE', styles, ttl_ms)
end
"""
# KEYS task, user index, task id index, status index, style index, styles set
# ARGV json, record key, score, cutoff, ttl_ms, style
_CREATE = (
    _ADD
    + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[5]) then return 0 end
add(KEYS[2], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
add(KEYS[3], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
add(KEYS[4], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
add_style(KEYS[5], KEYS[6], ARGV[6], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return 1
"""
)
# Compare-and-swap: write only if the record is still what the caller read.
# KEYS task, old status index, new status index, old style index, new style index, styles set
# ARGV expected json, new json, record key, score, cutoff, ttl_ms, new style
# Returns 1 swapped, 0 changed meanwhile (read again), -1 gone.
_SWAP = (
    _ADD
    + """
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
if KEYS[2] ~= KEYS[3] then
  redis.call('ZREM', KEYS[2], ARGV[3])
  add(KEYS[3], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
end
if KEYS[4] ~= KEYS[5] then
  redis.call('ZREM', KEYS[4], ARGV[3])
  add_style(KEYS[5], KEYS[6], ARGV[7], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
end
return 1
"""
)
# KEYS the indexes to count; ARGV cutoff. Trims each, returns their sizes in order.
_COUNT = """
local sizes = {}
for i, index in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', index, '-inf', ARGV[1])
  sizes[i] = redis.call('ZCARD', index)
end
return sizes
"""
# KEYS lease; ARGV owner, ttl_ms. Free -> take it; already ours -> extend it.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS cancels; ARGV task_id, now, cutoff, ttl_ms, max per user. Newest kept, expired dropped.
_ADD_CANCEL = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[5]) - 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
"""
# KEYS ended set, claim; ARGV task_id, size, claim_ms, ttl_ms. 1: complete and claimed here.
_END_BATCH_TASK = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then return 0 end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then return 1 end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: object) -> str | None:
    """A reply as text, whether or not the client decodes responses (None stays None)."""
    return None if value is None else _str(value)


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisTaskStore:
    """Task records and leases in Redis (redis.asyncio). It owns its client: close() closes it."""

    def __init__(self, client: Redis, *, ttl_s: float, key_prefix: str = "style-consumer:") -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._prefix = key_prefix
        self._create = client.register_script(_CREATE)
        self._swap = client.register_script(_SWAP)
        self._count = client.register_script(_COUNT)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._add_cancel = client.register_script(_ADD_CANCEL)
        self._end_batch_task = client.register_script(_END_BATCH_TASK)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl_s: float,
        key_prefix: str = "style-consumer:",
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 5.0,
    ) -> RedisTaskStore:
        """A store on its own connection pool to `url` (e.g. redis://host:6379/0)."""
        client = Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=command_timeout_s,
        )
        return cls(client, ttl_s=ttl_s, key_prefix=key_prefix)

    def __repr__(self) -> str:
        return f"<RedisTaskStore prefix={self._prefix!r} ttl_s={self._ttl_s}>"

    # --- records -------------------------------------------------------------------------

    async def create(self, record: TaskRecord) -> bool:
        keys = [
            self._key("task", record.key),
            self._key("user", record.user_id),
            self._key("ids", record.task_id),
            self._key("status", record.status),
            self._key("style", record.style_type),
            self._key("styles"),
        ]
        args = [record.model_dump_json(), record.key, *self._index_args(record)]
        return bool(await self._create(keys=keys, args=[*args, record.style_type]))

    async def get(self, key: str) -> TaskRecord | None:
        raw = _text(await self._redis.get(self._key("task", key)))
        return None if raw is None else TaskRecord.model_validate_json(raw)

    async def update(self, key: str, **changes: Any) -> TaskRecord | None:
        """Read, apply the rules, compare-and-swap; read again if another write came between."""
        for _ in range(MAX_SWAP_TRIES):
            done, record = await self._update_once(key, changes)
            if done:
                return record
        raise RedisError(f"task {key!r}: {MAX_SWAP_TRIES} concurrent updates collided")

    async def _update_once(
        self, key: str, changes: dict[str, Any]
    ) -> tuple[bool, TaskRecord | None]:
        """(True, result) when settled; (False, None) when another write came between."""
        raw = _text(await self._redis.get(self._key("task", key)))
        if raw is None:
            return True, None
        current = TaskRecord.model_validate_json(raw)
        new = apply_changes(current, changes, utcnow())
        if new is None or new is current:
            return True, new
        args = [raw, new.model_dump_json(), key, *self._index_args(new), new.style_type]
        swapped = await self._swap(keys=self._swap_keys(current, new), args=args)
        return swapped != 0, (new if swapped == 1 else None)

    async def find(self, task_id: str, limit: int = 10) -> list[TaskRecord]:
        """O(log n + limit): trim the expired (O(those)), ZRANGE `limit` keys, one MGET."""
        keys = await self._live_keys(self._key("ids", task_id), limit, newest_first=False)
        return await self._records(keys)

    async def list_for_user(self, user_id: str, limit: int) -> list[TaskRecord]:
        """O(log n + limit): trim the expired (O(those)), ZREVRANGE `limit` keys, one MGET."""
        keys = await self._live_keys(self._key("user", user_id), limit, newest_first=True)
        return await self._records(keys)

    async def _live_keys(self, index: str, limit: int, *, newest_first: bool) -> list[str]:
        """The first `limit` record keys of `index` after trimming what is past its TTL."""
        if limit <= 0:
            return []
        await self._redis.zremrangebyscore(index, "-inf", self._cutoff())
        keys = await self._redis.zrange(index, 0, limit - 1, desc=newest_first)
        return [_str(key) for key in keys]

    async def _records(self, keys: list[str]) -> list[TaskRecord]:
        """The records under `keys`, in order; those gone meanwhile are left out."""
        if not keys:
            return []
        raws = await self._redis.mget([self._key("task", key) for key in keys])
        return [TaskRecord.model_validate_json(_str(raw)) for raw in raws if raw is not None]

    async def counts(self) -> TaskCounts:
        styles = sorted(_str(style) for style in await self._redis.smembers(self._key("styles")))
        statuses = [status.value for status in TaskStatus]
        keys = [self._key("status", s) for s in statuses] + [self._key("style", s) for s in styles]
        sizes = [int(n) for n in await self._count(keys=keys, args=[self._cutoff()])]
        by_style = dict(zip(styles, sizes[len(statuses) :], strict=True))
        return TaskCounts(
            by_status=dict(zip(statuses, sizes, strict=False)),
            by_style={style: n for style, n in by_style.items() if n},
        )

    # --- leases --------------------------------------------------------------------------

    async def acquire_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        return bool(await self._acquire(keys=[self._key("lease", key)], args=[owner, _ms(ttl_s)]))

    async def renew_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        return bool(await self._renew(keys=[self._key("lease", key)], args=[owner, _ms(ttl_s)]))

    async def release_lease(self, key: str, owner: str) -> None:
        await self._release(keys=[self._key("lease", key)], args=[owner])

    async def lease_owner(self, key: str) -> str | None:
        return _text(await self._redis.get(self._key("lease", key)))

    # --- early cancels and batches -------------------------------------------------------

    async def add_cancel(self, user_id: str, task_id: str) -> None:
        now = time.time()
        cutoff, ttl_ms = now - self._ttl_s, _ms(self._ttl_s)
        args: list[str | float] = [task_id, now, cutoff, ttl_ms, MAX_CANCELS_PER_USER]
        await self._add_cancel(keys=[self._key("cancels", user_id)], args=args)

    async def cancel_requested(self, user_id: str, task_id: str) -> bool:
        score = await self._redis.zscore(self._key("cancels", user_id), task_id)
        return score is not None and float(score) > self._cutoff()

    async def end_batch_task(
        self, batch_id: str, task_id: str, size: int, claim_ttl_s: float
    ) -> bool:
        keys = [self._key("batch", batch_id), self._key("batch-claim", batch_id)]
        args: list[str | int] = [task_id, size, _ms(claim_ttl_s), _ms(self._ttl_s)]
        return bool(await self._end_batch_task(keys=keys, args=args))

    async def confirm_batch_announced(self, batch_id: str) -> None:
        await self._redis.set(self._key("batch-claim", batch_id), "1", px=_ms(self._ttl_s))

    # --- lifetime ------------------------------------------------------------------------

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()

    # --- keys ----------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def _cutoff(self) -> float:
        """Index entries scored (created) before this are past their TTL."""
        return time.time() - self._ttl_s

    def _index_args(self, record: TaskRecord) -> list[float | int]:
        """score, cutoff, ttl_ms: what the Lua `add` needs."""
        return [record.created_at.timestamp(), self._cutoff(), _ms(self._ttl_s)]

    def _swap_keys(self, old: TaskRecord, new: TaskRecord) -> list[str]:
        return [
            self._key("task", new.key),
            self._key("status", old.status),
            self._key("status", new.status),
            self._key("style", old.style_type),
            self._key("style", new.style_type),
            self._key("styles"),
        ]
