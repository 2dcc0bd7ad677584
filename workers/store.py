"""The aggregate store: per-partition and global order sums and counts in Redis.

Each *source* (one partition of ``orders`` or of ``orders-retry``) has the
offset up to which its orders are counted. A batch is applied by one Lua
script that counts only messages at or past that offset and moves it, all
atomically: replaying a batch (after a crash, a Kafka rewind, a lost reply)
changes nothing, and a worker resumes from the stored offset.

Keys share the hash tag ``{prefix}`` so that one script only touches one slot.
Sums are integer cents, so the average never drifts.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from .errors import ServiceUnavailable

# KEYS: source, total, heartbeat, replayed-orders set, parked records, target_0 .. target_k
# ARGV: known offset (what the worker last saw stored, '' for none), to_offset,
#       heartbeat_value, heartbeat_ttl_ms, now_ms, items: one JSON array (a single
#       argument: packing thousands of arguments costs redis-py more than the
#       whole script) of [offset, code, cents, tag] per message, in offset
#       order, and the worker's committed Kafka offset K ('' for none).
#       code >= 0: counted into target <code>; -1: dead-lettered; -2: sent to the
#       retry topic. For a counted item a non-empty tag (the orderId of a replayed
#       dead letter) counts only the first time; for a parked item a non-empty tag
#       is the decision's record, kept (scored by offset) until K passes it, so
#       that replaying offsets between K and R publishes the same decision again.
# Returns {status, counted, offset, total count, total cents}: status 1 applied;
# 0 state missing where the worker knew some (Redis lost it: rebuild from the log
# start); 2 stored offset behind what the worker knew (Redis lost its last writes,
# e.g. a crash inside the AOF fsync window: rewind to the returned offset).
_APPLY = """
local src, total, hb, replayed, parked = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
redis.call('SET', hb, ARGV[3], 'PX', ARGV[4])
if ARGV[7] ~= '' then redis.call('ZREMRANGEBYSCORE', parked, '-inf', '(' .. ARGV[7]) end
local stored = redis.call('HGET', src, 'offset')
if not stored then
  if ARGV[1] ~= '' then return {0, 0, -1, 0, 0} end
  stored = -1
else
  stored = tonumber(stored)
  if ARGV[1] ~= '' and stored < tonumber(ARGV[1]) then return {2, 0, stored, 0, 0} end
end
local counts, cents = {}, {}
local counted, counted_cents, dead, retried, duplicates = 0, 0, 0, 0, 0
for _, item in ipairs(cjson.decode(ARGV[6])) do
  if item[1] >= stored then
    local code = item[2]
    if code < 0 then
      if code == -1 then dead = dead + 1 else retried = retried + 1 end
      if item[4] ~= '' then redis.call('ZADD', parked, item[1], item[1] .. ':' .. item[4]) end
    elseif item[4] ~= '' and redis.call('SADD', replayed, item[4]) == 0 then
      duplicates = duplicates + 1
    else
      local c = item[3]
      counts[code] = (counts[code] or 0) + 1
      cents[code] = (cents[code] or 0) + c
      counted = counted + 1
      counted_cents = counted_cents + c
    end
  end
end
for t, n in pairs(counts) do
  local key = KEYS[6 + t]
  redis.call('HINCRBY', key, 'count', n)
  redis.call('HINCRBY', key, 'cents', string.format('%d', cents[t]))
end
if counted > 0 then
  redis.call('HINCRBY', total, 'count', counted)
  redis.call('HINCRBY', total, 'cents', string.format('%d', counted_cents))
end
if dead > 0 then redis.call('HINCRBY', total, 'dead_lettered', dead) end
if retried > 0 then redis.call('HINCRBY', total, 'retried', retried) end
if duplicates > 0 then redis.call('HINCRBY', total, 'duplicate_replays', duplicates) end
local to_offset = tonumber(ARGV[2])
if to_offset > stored then
  redis.call('HSET', src, 'offset', ARGV[2])
  stored = to_offset
end
redis.call('HINCRBY', src, 'counted', counted)
redis.call('HSET', src, 'updated_ms', ARGV[5])
local t = redis.call('HMGET', total, 'count', 'cents')
return {1, counted, stored, tonumber(t[1] or '0'), tonumber(t[2] or '0')}
"""

# KEYS: source, heartbeat. ARGV: heartbeat_value, heartbeat_ttl_ms. Returns the
# source's stored offset (nil if it has no state).
_TOUCH = """
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return redis.call('HGET', KEYS[1], 'offset')
"""

# KEYS: identity, then every key of the aggregate's state. ARGV: force ('1' or
# '0'), then the current identity as field/value pairs. Compares the stored
# identity (which incarnation of the topics the state counts) with the current
# one; on a difference (or force) deletes the state and stores the current
# identity, all atomically, so two workers that both notice reset it once.
# Returns {status, stored identity as field/value pairs}: 0 adopted (none was
# stored), 1 same, 2 reset.
_IDENTITY = """
local stored = redis.call('HGETALL', KEYS[1])
local same = #stored > 0
local current = {}
for i = 2, #ARGV, 2 do current[ARGV[i]] = ARGV[i + 1] end
for i = 1, #stored, 2 do
  if current[stored[i]] ~= stored[i + 1] then same = false end
end
if same and ARGV[1] == '0' then return {1, stored} end
local status = 0
if #stored > 0 or ARGV[1] == '1' then
  status = 2
  for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
end
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return {status, stored}
"""

# ARGV: a MATCH pattern. Deletes every key it matches in one script, so a worker's
# batch lands wholly before or wholly after the wipe. (SCAN then DEL from the client
# is not a wipe: a batch between the two keeps the source offset it created and
# loses the totals it added to, and no worker can tell.) Returns how many it deleted.
_CLEAR = """
local cursor, deleted = '0', 0
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do deleted = deleted + redis.call('DEL', key) end
until cursor == '0'
return deleted
"""

HEARTBEAT_TTL_MS = 15000

_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
               redis.exceptions.BusyLoadingError, redis.exceptions.ReadOnlyError,
               redis.exceptions.TryAgainError)


@dataclass(frozen=True)
class Source:
    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}"


DEAD = -1
RETRIED = -2


@dataclass
class SourceBatch:
    """What one batch of one source adds, and the offset after it.

    ``items`` are (offset, target partition or DEAD/RETRIED, cents, replay tag).
    """

    source: Source
    to_offset: int
    known_offset: int | None  # the offset the worker last saw stored; None: no state
    items: list[tuple[int, int, int, str]] = field(default_factory=list)
    committed_offset: int | None = None  # K: decision records below it are dropped

    def count(self, offset: int, target: int, cents: int, replay_of: str = "") -> None:
        self.items.append((offset, target, cents, replay_of))

    def park(self, offset: int, kind: int, record: str = "") -> None:
        """Record a dead-lettered (DEAD) or retried (RETRIED) message.

        ``record`` (the decision, as Decider writes it) is kept until K passes the
        offset; empty when the decision is already committed in Kafka.
        """
        self.items.append((offset, kind, 0, record))


APPLIED, STATE_LOST, STATE_BEHIND = 1, 0, 2
ADOPTED, SAME, RESET = 0, 1, 2  # ensure_identity


@dataclass(frozen=True)
class ApplyResult:
    source: Source
    status: int  # APPLIED, STATE_LOST or STATE_BEHIND
    counted: int
    offset: int
    total: Totals


@dataclass(frozen=True)
class Totals:
    count: int
    cents: int
    dead_lettered: int = 0
    retried: int = 0
    duplicate_replays: int = 0

    @property
    def sum(self) -> float:
        return self.cents / 100

    @property
    def average(self) -> float | None:
        return round(self.cents / self.count / 100, 6) if self.count else None

    def as_dict(self) -> dict:
        return {"count": self.count, "sum": round(self.sum, 2), "average": self.average}


class AggregateStore:
    """Reads and updates the aggregate; every Redis outage raises ServiceUnavailable."""

    def __init__(self, client: redis.Redis, prefix: str):
        self._redis = client
        self._prefix = prefix
        self._apply = client.register_script(_APPLY)
        self._touch = client.register_script(_TOUCH)
        self._identity = client.register_script(_IDENTITY)
        self._clear = client.register_script(_CLEAR)

    # -- keys ----------------------------------------------------------------
    def _key(self, *parts: object) -> str:
        return ":".join([f"{{{self._prefix}}}", *map(str, parts)])

    def source_key(self, source: Source) -> str:
        return self._key("source", source.topic, source.partition)

    def partition_key(self, partition: int) -> str:
        return self._key("partition", partition)

    def heartbeat_key(self, worker: str) -> str:
        return self._key("worker", worker)

    def parked_key(self, source: Source) -> str:
        return self._key("parked", source.topic, source.partition)

    @property
    def identity_key(self) -> str:
        return self._key("identity")

    @property
    def total_key(self) -> str:
        return self._key("total")

    @property
    def replayed_key(self) -> str:
        return self._key("replayed-orders")

    @property
    def replays_key(self) -> str:
        return self._key("replays")

    @property
    def schemas_key(self) -> str:
        return self._key("schemas")

    # -- updates ---------------------------------------------------------------
    def apply(self, batches: Sequence[SourceBatch], *, worker: str, heartbeat: dict,
              now_ms: int) -> list[ApplyResult]:
        """Apply every source's batch in one round trip (a pipeline of script calls)."""
        beat = json.dumps(heartbeat)
        try:
            pipe = self._redis.pipeline(transaction=False)
            for batch in batches:
                targets = sorted({target for _, target, _, _ in batch.items if target >= 0})
                index = {target: i for i, target in enumerate(targets)}
                known = "" if batch.known_offset is None else batch.known_offset
                committed = "" if batch.committed_offset is None else batch.committed_offset
                items = json.dumps([(offset, index[target] if target >= 0 else target, cents, tag)
                                    for offset, target, cents, tag in batch.items])
                args = [known, batch.to_offset, beat, HEARTBEAT_TTL_MS, now_ms, items, committed]
                keys = [self.source_key(batch.source), self.total_key, self.heartbeat_key(worker),
                        self.replayed_key, self.parked_key(batch.source), *(self.partition_key(t) for t in targets)]
                self._apply(keys=keys, args=args, client=pipe)
            replies = pipe.execute()
        except _REDIS_DOWN as exc:
            raise ServiceUnavailable(f"redis: {exc}") from exc
        return [ApplyResult(batch.source, int(status), int(counted), int(offset), Totals(int(count), int(cents)))
                for batch, (status, counted, offset, count, cents) in zip(batches, replies, strict=True)]

    def touch(self, sources: Sequence[Source], *, worker: str, heartbeat: dict) -> dict[Source, int | None]:
        """Refresh the worker's heartbeat; return each source's stored offset (None: no state)."""
        beat = json.dumps(heartbeat)
        try:
            pipe = self._redis.pipeline(transaction=False)
            for source in sources:
                self._touch(keys=[self.source_key(source), self.heartbeat_key(worker)],
                            args=[beat, HEARTBEAT_TTL_MS], client=pipe)
            replies = pipe.execute()
        except _REDIS_DOWN as exc:
            raise ServiceUnavailable(f"redis: {exc}") from exc
        return {source: (int(stored) if stored is not None else None)
                for source, stored in zip(sources, replies, strict=True)}

    def ensure_identity(self, identity: dict[str, str], *, partitions: dict[str, int],
                        force: bool = False) -> tuple[int, dict[str, str]]:
        """Tie the aggregate to ``identity`` (topic name -> topic id); returns (status, stored identity).

        Status ADOPTED, SAME or RESET. On RESET (another incarnation of a topic, or
        ``force``) every state key is deleted first: the counts of a topic that no
        longer exists must not stay in the global figures. ``partitions`` (topic ->
        partition count) names the keys.
        """
        keys = [self.identity_key, self.total_key, self.replayed_key, self.replays_key]
        for topic, count in partitions.items():
            for p in range(count):
                source = Source(topic, p)
                keys += [self.source_key(source), self.parked_key(source), self.partition_key(p)]
        args: list[str] = ["1" if force else "0"]
        for name, topic_id in sorted(identity.items()):
            args += [name, topic_id]
        try:
            status, stored = self._identity(keys=list(dict.fromkeys(keys)), args=args)
        except _REDIS_DOWN as exc:
            raise ServiceUnavailable(f"redis: {exc}") from exc
        pairs = [v.decode() for v in stored]
        return int(status), dict(zip(pairs[::2], pairs[1::2], strict=True))

    def state(self, sources: Sequence[Source]) -> tuple[dict[Source, int | None], dict[Source, dict[int, str]]]:
        """Each source's R and kept decision records, read at one instant (MULTI)."""
        try:
            pipe = self._redis.pipeline(transaction=True)
            for source in sources:
                pipe.hget(self.source_key(source), "offset")
                pipe.zrange(self.parked_key(source), 0, -1, withscores=True)
            replies = pipe.execute()
        except _REDIS_DOWN as exc:
            raise ServiceUnavailable(f"redis: {exc}") from exc
        offsets, parked = replies[0::2], replies[1::2]
        return ({s: (int(r) if r is not None else None) for s, r in zip(sources, offsets, strict=True)},
                {s: _records(r) for s, r in zip(sources, parked, strict=True)})

    # -- reads -------------------------------------------------------------------
    def positions(self, sources: Sequence[Source]) -> dict[Source, int | None]:
        """The next offset to count for each source, or None if it has no state."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            for source in sources:
                pipe.hget(self.source_key(source), "offset")
            replies = pipe.execute()
        except _REDIS_DOWN as exc:
            raise ServiceUnavailable(f"redis: {exc}") from exc
        return {s: (int(r) if r is not None else None) for s, r in zip(sources, replies, strict=True)}

    def snapshot(self, partitions: int, sources: Sequence[Source] = (),
                 workers: Sequence[str] = ()) -> dict:
        """Totals, per-partition totals, source positions and heartbeats in one round trip."""
        try:
            pipe = self._redis.pipeline(transaction=True)  # one consistent view
            pipe.hgetall(self.total_key)
            for p in range(partitions):
                pipe.hgetall(self.partition_key(p))
            for source in sources:
                pipe.hgetall(self.source_key(source))
            for worker in workers:
                pipe.get(self.heartbeat_key(worker))
            replies = pipe.execute()
        except _REDIS_DOWN as exc:
            raise ServiceUnavailable(f"redis: {exc}") from exc
        total = _totals(replies[0])
        parts = [_totals(r) for r in replies[1:1 + partitions]]
        rest = replies[1 + partitions:]
        src = {s: {k.decode(): int(v) for k, v in r.items()}
               for s, r in zip(sources, rest[:len(sources)], strict=True)}
        beats = {w: (json.loads(r) if r else None) for w, r in zip(workers, rest[len(sources):], strict=True)}
        return {"total": total, "partitions": parts, "sources": src, "workers": beats}

    def record_replays(self, replays: dict[str, dict]) -> None:
        """Remember which dead letters were replayed (id -> details), one round trip."""
        if not replays:
            return
        try:
            self._redis.hset(self.replays_key, mapping={k: json.dumps(v) for k, v in replays.items()})
        except _REDIS_DOWN as exc:
            raise ServiceUnavailable(f"redis: {exc}") from exc

    def replays(self) -> dict[str, dict]:
        """Every recorded replay: dead letter id -> details."""
        try:
            raw = self._redis.hgetall(self.replays_key)
        except _REDIS_DOWN as exc:
            raise ServiceUnavailable(f"redis: {exc}") from exc
        return {_text(k): json.loads(v) for k, v in raw.items()}

    # -- writer schemas ----------------------------------------------------------
    # A copy of every writer schema the pool has read, by registry id: a registry
    # that forgets an id (restarted without durable storage, restored from an old
    # backup) must not turn orders already counted into dead letters.
    def keep_schema(self, schema_id: int, schema: str) -> str:
        """Keep ``schema`` as the copy for ``schema_id`` unless one is kept; returns the kept copy."""
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hsetnx(self.schemas_key, str(schema_id), schema)
            pipe.hget(self.schemas_key, str(schema_id))
            _, kept = pipe.execute()
        except _REDIS_DOWN as exc:
            raise ServiceUnavailable(f"redis: {exc}") from exc
        return _text(kept)

    def kept_schema(self, schema_id: int) -> str | None:
        """The kept copy of the writer schema ``schema_id``, or None."""
        try:
            kept = self._redis.hget(self.schemas_key, str(schema_id))
        except _REDIS_DOWN as exc:
            raise ServiceUnavailable(f"redis: {exc}") from exc
        return _text(kept) if kept is not None else None

    def clear(self) -> int:
        """Delete every key under this prefix at once (tests and `orders reset`); returns how many."""
        try:
            return int(self._clear(args=[f"{{{self._prefix}}}:*"]))
        except _REDIS_DOWN as exc:
            raise ServiceUnavailable(f"redis: {exc}") from exc


def _records(parked: list[tuple[bytes, float]]) -> dict[int, str]:
    # Members are "<offset>:<record>": unique per offset even where two records read the same.
    return {int(score): member.decode().partition(":")[2] for member, score in parked}


def _text(value: bytes | str) -> str:
    # The client is made with decode_responses=False, so replies are bytes.
    return value.decode() if isinstance(value, bytes) else value


def _totals(raw: dict) -> Totals:
    return Totals(**{f: int(raw.get(f.encode(), 0)) for f in
                     ("count", "cents", "dead_lettered", "retried", "duplicate_replays")})
