"""The aggregate store: order counts and sums in Redis, in one slot per source.

A *source* is one partition of ``orders`` or of a retry topic (``orders-retry-<delay>ms``). Everything the
exactly-once protocol keeps for a source lives under a hash tag of its own,
``{<prefix>:<topic>:<partition>}``, so a Redis Cluster spreads the sources over
its nodes, and every Lua script below touches the keys of one slot only:

    {P:T:N}:source     hash: offset (R), counted, updated_ms, identity (the topics'
                       ids), and the totals counted *from* this source: cents,
                       dead_lettered, retried, duplicate_replays, and count:<p>,
                       cents:<p> per target partition p (a retry source counts an
                       order into its original partition)
    {P:T:N}:parked     zset: the decision records of parked offsets, until K passes them
    {P:T:N}:replayed   hash: orderId -> offset, for each replayed order counted here
    {P:replay:I:ID}    string: the claim on replayed orderId ID, "topic:partition:offset"
                       of the copy that counts (I: the orders and DLQ topics' incarnation)
    {P}:sources        set: every source that may hold state ("topic:partition")
    {P}:worker:NAME, {P}:schemas, {P}:replays   heartbeats, writer schema copies, replay records
    {P}:counters:HOST  hash: "<name>:<worker or program>" -> count, what a host's processes
                       count outside the batch script (transaction aborts, restarts)

**Exactly once per source.** One script per batch counts only offsets at or past
R, adds them to the source's totals and moves R, all atomically in the source's
slot: applying a batch twice counts it once, a crash leaves R and the totals
consistent, and the engine's restart at min(R, K) works per source. A source's
state lives on one node (one AOF), so it is lost or goes back in time as a
whole, which the engine detects ("state missing", "state behind").

**The global figures are a sum.** Each order is counted by exactly one source:
the partition of ``orders`` where its first attempt succeeded, or the retry
partition of the attempt that did (a parked offset counts nothing at its
source). So the sum over the sources of exactly-once per-source totals is the
exactly-once aggregate, and it is merged on read, in integer cents. A source is
added to ``{P}:sources`` before it holds state (the identity check at start-up,
the first batch of a source, every heartbeat), and readers merge that set with
the sources they know from the settings. Each source's figures are read
atomically; the sum is not one point in time across nodes (a cluster has no
cross-node transaction), but it never counts an order twice or loses one.

**Replays count once per orderId** (``orders dlq replay``): copies of one order
may arrive through different sources (other partitions of ``orders``, the retry
topic). Before the batch script runs, each replayed copy claims its orderId
(``SET NX``, a key in the orderId's own slot) and counts only if the claim names
it, by source and offset. The owner is whichever copy claimed first, and it does
not change: a crash between claim and batch replays the same batch, which finds
itself the owner and counts once. Two cases move a claim, each by a
compare-and-set on the claim alone: a *stale* claim (its owner's R has passed
the owner's offset and the owner never counted the orderId there: that offset
was decided otherwise after a restart) passes to the claimant; and a claim that
Redis lost (one node's lost AOF tail) is restored from the sources' own
``replayed`` hashes, written in the batch script together with the count, which
every claimant reads: a copy that another source already counted is a
duplicate. Only batches with replayed orders pay for this (two round trips,
three when a claim moves).

**Tied to the topics it counts.** Each source's hash holds the ids of the topics
(``identity``), checked per source in one script that deletes the source's state
when a topic it names has another id now (or when forced), so state of another
incarnation of the topics is never mixed into the sums. A retry level created
since (new backoff settings) only joins the identity. Claims are named by that incarnation.
Sums are integer cents, so the average never drifts.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, SlotNotCoveredError

from .clients import CLUSTER_UNREACHABLE, RedisClient
from .errors import ServiceUnavailable

# KEYS: source, parked records, replayed orders (one slot: the source's)
# ARGV: known offset (what the worker last saw stored, '' for none), to_offset,
#       now_ms, items: one JSON array (a single argument: packing thousands of
#       arguments costs redis-py more than the whole script) of [offset, code,
#       cents, tag] per message, in offset order, the worker's committed Kafka
#       offset K ('' for none), the topics' identity ('' if unknown), and the
#       sums: '' or [from, [[target, orders, cents], ...]], plain counted orders
#       (no replay tag) at offsets from `from` on, summed per target partition.
#       code >= 0: counted into target partition <code>; -1: dead-lettered; -2:
#       sent to the retry topic; -3: a replayed order another copy counts (the
#       claim decided it before this script). For a counted item a non-empty tag
#       (the orderId of a replayed dead letter) is recorded in the replayed hash
#       and counts once per source; for a parked item a non-empty tag is the
#       decision's record, kept (scored by offset) until K passes it, so that
#       replaying offsets between K and R publishes the same decision again.
# Only items at or past the stored R count, and R moves in the same step: that
# is the whole exactly-once guard for a source. The sums keep it: the worker sums
# only orders at or past the R it knew, and the script applies anything only when
# the stored R is that R (else status 2 or 3 below, nothing applied), so every
# summed order is at or past the stored R, as an item would have had to be. The
# check on `from` makes a worker that broke that rule fail loudly, never count twice.
# Returns {status, counted, offset}: status 1 applied; 0 state missing where the
# worker knew some (Redis lost it: rebuild from the log start); 2 stored offset
# behind what the worker knew (Redis lost its last writes, e.g. a crash inside
# the AOF fsync window: rewind to the returned offset); 3 stored offset ahead of
# what the worker knew, or state where it knew none: another worker wrote this
# source since (a zombie that lost the partition, or the partition's previous
# owner finishing a batch). Nothing is applied; the worker reloads the state (R and
# the parked records) and replays from min(R, K), so the other writer's decisions
# are the ones published, whatever this worker would have decided.
_APPLY = """
local src, parked, replayed = KEYS[1], KEYS[2], KEYS[3]
if ARGV[5] ~= '' then redis.call('ZREMRANGEBYSCORE', parked, '-inf', '(' .. ARGV[5]) end
local stored = redis.call('HGET', src, 'offset')
if not stored then
  if ARGV[1] ~= '' then return {0, 0, -1} end
  stored = -1
  if ARGV[6] ~= '' then redis.call('HSETNX', src, 'identity', ARGV[6]) end
else
  stored = tonumber(stored)
  if ARGV[1] == '' or stored > tonumber(ARGV[1]) then return {3, 0, stored} end
  if stored < tonumber(ARGV[1]) then return {2, 0, stored} end
end
-- A replayed orderId counts at one offset of this source only (the claim already
-- settled it between sources; this guards the source's own copies).
local function first_count(tag, offset)
  if tag == '' or redis.call('HSETNX', replayed, tag, offset) == 1 then return true end
  return tonumber(redis.call('HGET', replayed, tag)) == offset
end
local counts, cents = {}, {}
local counted, counted_cents, dead, retried, duplicates = 0, 0, 0, 0, 0
if ARGV[7] ~= '' then
  local sums = cjson.decode(ARGV[7])
  if sums[1] < stored then
    return redis.error_reply('summed orders from offset ' .. sums[1] .. ' below R ' .. stored)
  end
  for _, s in ipairs(sums[2]) do
    counts[s[1]] = (counts[s[1]] or 0) + s[2]
    cents[s[1]] = (cents[s[1]] or 0) + s[3]
    counted = counted + s[2]
    counted_cents = counted_cents + s[3]
  end
end
for _, item in ipairs(cjson.decode(ARGV[4])) do
  local offset, code, tag = item[1], item[2], item[4]
  if offset >= stored then
    if code == -1 or code == -2 then
      if code == -1 then dead = dead + 1 else retried = retried + 1 end
      if tag ~= '' then redis.call('ZADD', parked, offset, offset .. ':' .. tag) end
    elseif code == -3 or not first_count(tag, offset) then
      duplicates = duplicates + 1
    else
      counts[code] = (counts[code] or 0) + 1
      cents[code] = (cents[code] or 0) + item[3]
      counted = counted + 1
      counted_cents = counted_cents + item[3]
    end
  end
end
for t, n in pairs(counts) do
  redis.call('HINCRBY', src, 'count:' .. t, n)
  redis.call('HINCRBY', src, 'cents:' .. t, string.format('%d', cents[t]))
end
if counted > 0 then redis.call('HINCRBY', src, 'cents', string.format('%d', counted_cents)) end
if dead > 0 then redis.call('HINCRBY', src, 'dead_lettered', dead) end
if retried > 0 then redis.call('HINCRBY', src, 'retried', retried) end
if duplicates > 0 then redis.call('HINCRBY', src, 'duplicate_replays', duplicates) end
local to_offset = tonumber(ARGV[2])
if to_offset > stored then
  redis.call('HSET', src, 'offset', ARGV[2])
  stored = to_offset
end
redis.call('HINCRBY', src, 'counted', counted)
redis.call('HSET', src, 'updated_ms', ARGV[3])
return {1, counted, stored}
"""

# KEYS: source, parked records, replayed orders (one slot). ARGV: the current
# identity (a JSON object: topic name -> topic id, every topic the worker knows),
# force ('1' or '0'). The state belongs to another incarnation of the topics if a
# topic named both in the stored identity and in the current one has another id
# there: then (or when forced) the source's state is deleted and the current
# identity stored, atomically, so that two workers that both notice reset it once.
# A topic new to the stored identity (a retry delay level created since) is added
# to it; one the worker does not know (a level of other backoff settings, on a host
# not yet restarted with them) is kept: neither is a reset, so hosts whose retry
# levels differ never reset each other's state. A source without an identity
# adopts the current one. Returns {status, stored identity}: 0 adopted, 1 same, 2 reset.
_IDENTITY = """
local stored = redis.call('HGET', KEYS[1], 'identity')
if ARGV[2] == '0' then
  if not stored then
    redis.call('HSET', KEYS[1], 'identity', ARGV[1])
    return {0, ''}
  end
  if stored == ARGV[1] then return {1, stored} end
  local ok, known = pcall(cjson.decode, stored)
  if ok and type(known) == 'table' then
    local same, grown = true, false
    for name, id in pairs(cjson.decode(ARGV[1])) do
      if known[name] == nil then
        known[name] = id
        grown = true
      elseif known[name] ~= id then
        same = false
      end
    end
    if same then
      if grown then redis.call('HSET', KEYS[1], 'identity', cjson.encode(known)) end
      return {1, stored}
    end
  end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'identity', ARGV[1])
return {2, stored or ''}
"""

# KEYS: one replay claim. ARGV: new owner, expected owner. Moves the claim to the
# new owner if it still names the expected one (or vanished); returns the owner.
_MOVE_CLAIM = """
local current = redis.call('GET', KEYS[1])
if not current or current == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return current
"""

# KEYS: source, parked records (one slot). Returns {R or false, the records with
# their offsets}: read at one instant, so records and the R they belong to agree.
_STATE = """
return {redis.call('HGET', KEYS[1], 'offset'), redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
"""

# ARGV: a MATCH pattern. Deletes every key of this node that it matches in one
# script, so a worker's batch lands wholly before or wholly after the wipe. (SCAN
# then DEL from the client is not a wipe: a batch between the two keeps a source it
# created while the registry entry it added is deleted.) On a cluster it runs on
# each primary with the flag that lets one script touch that node's many slots
# (Redis 7); a source lives in one slot, so each source is wiped whole.
_CLEAR = """
local cursor, deleted = '0', 0
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do deleted = deleted + redis.call('DEL', key) end
until cursor == '0'
return deleted
"""
_CLEAR_EACH_NODE = "#!lua flags=allow-cross-slot-keys\n" + _CLEAR

HEARTBEAT_TTL_MS = 15000

_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
               redis.exceptions.BusyLoadingError, redis.exceptions.ReadOnlyError,
               redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError, SlotNotCoveredError)


@contextmanager
def _outage_is_unavailable() -> Iterator[None]:
    """Turn a Redis outage into ServiceUnavailable (the caller waits and tries again)."""
    try:
        yield
    except _REDIS_DOWN as exc:
        raise ServiceUnavailable(f"redis: {exc}") from exc
    except RedisClusterException as exc:
        if CLUSTER_UNREACHABLE not in str(exc):
            raise  # a programming error, not an outage
        raise ServiceUnavailable(f"redis: {exc}") from exc


class Source(NamedTuple):
    """One partition of ``orders`` or of the retry topic.

    A named tuple, not a dataclass: one is looked up per consumed message, and a
    tuple is built, hashed and compared in C (the dataclass cost 10% of a
    partition worker's CPU).
    """

    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}"

    @classmethod
    def parse(cls, text: str) -> Source | None:
        """The source ``str(source)`` gave, or None (topic names never hold a colon)."""
        topic, _, partition = text.rpartition(":")
        return cls(topic, int(partition)) if topic and partition.isdigit() else None


DEAD = -1
RETRIED = -2
_DUPLICATE = -3  # a replayed order whose orderId another copy counts (decided by the claim)


@dataclass
class SourceBatch:
    """What one batch of one source adds, and the offset after it.

    ``items`` are (offset, target partition or DEAD/RETRIED, cents, replay tag):
    what the batch script must look at one by one. Plain counted orders at or
    past ``known_offset`` (the common case, nearly every order) are only summed,
    per target partition, in ``sums``: the script adds a few numbers instead of
    looping over thousands of items (see _APPLY for why that stays exact).
    """

    source: Source
    to_offset: int
    known_offset: int | None  # the offset the worker last saw stored; None: no state
    items: list[tuple[int, int, int, str]] = field(default_factory=list)
    committed_offset: int | None = None  # K: decision records below it are dropped
    has_replays: bool = False  # a replayed order is counted: its orderId is claimed first
    sums: dict[int, list[int]] = field(default_factory=dict)  # target -> [orders, cents]
    sum_from: int = -1  # the lowest offset in sums (-1: none)

    def count(self, offset: int, target: int, cents: int, replay_of: str = "") -> None:
        if replay_of or (self.known_offset is not None and offset < self.known_offset):
            # A replay's orderId is deduplicated per item; below R the script skips it.
            self.items.append((offset, target, cents, replay_of))
            self.has_replays = self.has_replays or bool(replay_of)
            return
        total = self.sums.get(target)
        if total is None:
            self.sums[target] = [1, cents]
        else:
            total[0] += 1
            total[1] += cents
        if self.sum_from < 0 or offset < self.sum_from:
            self.sum_from = offset

    def summed(self) -> str:
        """The ``sums`` argument of the batch script ('' when nothing is summed)."""
        if not self.sums:
            return ""
        return json.dumps([self.sum_from, [[t, n, c] for t, (n, c) in self.sums.items()]])

    def park(self, offset: int, kind: int, record: str = "") -> None:
        """Record a dead-lettered (DEAD) or retried (RETRIED) message.

        ``record`` (the decision, as Decider writes it) is kept until K passes the
        offset; empty when the decision is already committed in Kafka.
        """
        self.items.append((offset, kind, 0, record))


APPLIED, STATE_LOST, STATE_BEHIND, STATE_AHEAD = 1, 0, 2, 3
ADOPTED, SAME, RESET = 0, 1, 2  # ensure_identity


@dataclass(frozen=True)
class ApplyResult:
    source: Source
    status: int  # APPLIED, STATE_LOST, STATE_BEHIND or STATE_AHEAD
    counted: int
    offset: int


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


def target_field(name: str, partition: int) -> str:
    """The source hash's field for what it counted into ``partition`` (``count`` or ``cents``)."""
    return f"{name}:{partition}"


@dataclass
class _Replay:
    """A counted replayed order of a batch, and what its claim says."""

    batch: int  # index in the apply call
    item: int   # index in the batch's items
    source: Source
    offset: int
    order_id: str
    owner: str = ""  # the claim's owner, "topic:partition:offset"

    @property
    def me(self) -> str:
        return f"{self.source}:{self.offset}"


class AggregateStore:
    """Reads and updates the aggregate; every Redis outage raises ServiceUnavailable.

    ``client`` is a redis-py client (one server or a cluster), or a function that
    makes one: it is called on first use, so a store can be made while Redis is
    down (building a RedisCluster needs a node that answers).
    """

    def __init__(self, client: RedisClient | Callable[[], RedisClient], prefix: str):
        self._connect: Callable[[], RedisClient] = client if callable(client) else (lambda: client)
        self._redis: RedisClient | None = None
        self._prefix = prefix
        self._scripts = {name: (text, hashlib.sha1(text.encode()).hexdigest())
                         for name, text in (("apply", _APPLY), ("identity", _IDENTITY), ("move", _MOVE_CLAIM),
                                             ("state", _STATE))}
        self._identity = ""     # the topics' ids as last tied by ensure_identity (JSON), '' if not yet
        self._incarnation = ""  # a short digest of it: names the replay claims
        self._registered: set[Source] = set()  # the sources registry, as last read

    # -- keys ----------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return self._prefix

    def _key(self, *parts: object) -> str:
        return ":".join([f"{{{self._prefix}}}", *map(str, parts)])

    def _source_tag(self, source: Source) -> str:
        return f"{{{self._prefix}:{source.topic}:{source.partition}}}"

    def source_key(self, source: Source) -> str:
        return f"{self._source_tag(source)}:source"

    def parked_key(self, source: Source) -> str:
        return f"{self._source_tag(source)}:parked"

    def replayed_key(self, source: Source) -> str:
        return f"{self._source_tag(source)}:replayed"

    def claim_key(self, order_id: str) -> str:
        # In the orderId's own slot; a brace in an orderId only moves it to another slot.
        return f"{{{self._prefix}:replay:{self._incarnation}:{order_id}}}"

    def heartbeat_key(self, worker: str) -> str:
        return self._key("worker", worker)

    @property
    def sources_key(self) -> str:
        return self._key("sources")

    @property
    def replays_key(self) -> str:
        return self._key("replays")

    @property
    def schemas_key(self) -> str:
        return self._key("schemas")

    def counters_key(self, host: str) -> str:
        return self._key("counters", host)

    def _state_keys(self, source: Source) -> list[str]:
        return [self.source_key(source), self.parked_key(source), self.replayed_key(source)]

    # -- round trips -------------------------------------------------------------
    def _client(self) -> RedisClient:
        if self._redis is None:
            self._redis = self._connect()
        return self._redis

    @contextmanager
    def _outage(self) -> Iterator[None]:
        """A Redis outage is ServiceUnavailable; on a cluster, the slot map is read again first."""
        try:
            with _outage_is_unavailable():
                yield
        except ServiceUnavailable:
            self._refresh_slots()
            raise

    def _refresh_slots(self) -> None:
        # redis-py's cluster pipeline keeps sending a dead master's slots to it after its
        # replica took over (a connection error does not refresh the map): ask the nodes
        # it knows (the seed and every node discovered since) for the slots again.
        if isinstance(self._redis, RedisCluster):
            try:
                self._redis.nodes_manager.initialize()
            except (RedisClusterException, *_REDIS_DOWN):
                pass  # no node answered: the caller waits and tries again

    @property
    def _cluster(self) -> bool:
        return isinstance(self._client(), RedisCluster)

    def _run(self, commands: Sequence[tuple], consistent: bool = False, load_scripts: bool = True) -> list:
        """Run ``commands`` (argument tuples) in one pipeline and return their replies.

        A cluster pipeline sends each node its commands at once. ``consistent``
        wraps them in MULTI on a single server (a cluster has no cross-node
        transaction). Scripts run by sha: where a server has not loaded them (a
        restart, a new node), they are loaded and those commands sent again.
        """
        if not commands:
            return []
        client = self._client()
        pipe = client.pipeline(transaction=consistent and not self._cluster)
        for args in commands:
            pipe.execute_command(*args)
        replies = pipe.execute(raise_on_error=False)
        again = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if again and load_scripts:
            for text, _ in self._scripts.values():
                client.script_load(text)  # on every primary of a cluster
            for i, reply in zip(again, self._run([commands[i] for i in again], load_scripts=False), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _script(self, name: str, keys: Sequence[str], args: Sequence[object]) -> tuple:
        return ("EVALSHA", self._scripts[name][1], len(keys), *keys, *args)

    # -- updates ---------------------------------------------------------------
    def apply(self, batches: Sequence[SourceBatch], *, worker: str, heartbeat: dict,
              now_ms: int) -> list[ApplyResult]:
        """Apply every source's batch in one round trip (plus the replay claims, if any)."""
        with self._outage():
            duplicates = self.claim_replays(batches)
            commands: list[tuple] = [("SET", self.heartbeat_key(worker), json.dumps(heartbeat),
                                      "PX", HEARTBEAT_TTL_MS)]
            new = [str(b.source) for b in batches if b.known_offset is None]
            if new:  # registered before it holds state: readers merge every registered source
                commands.append(("SADD", self.sources_key, *new))
            for i, batch in enumerate(batches):
                known = "" if batch.known_offset is None else batch.known_offset
                committed = "" if batch.committed_offset is None else batch.committed_offset
                items = batch.items
                if duplicates:  # rare: only batches with replays pay for this
                    items = [(offset, _DUPLICATE if (i, j) in duplicates else target, cents, tag)
                             for j, (offset, target, cents, tag) in enumerate(items)]
                commands.append(self._script("apply", self._state_keys(batch.source),
                                             [known, batch.to_offset, now_ms, json.dumps(items), committed,
                                              self._identity, batch.summed()]))
            replies = self._run(commands)[-len(batches):] if batches else []
        return [ApplyResult(batch.source, int(status), int(counted), int(offset))
                for batch, (status, counted, offset) in zip(batches, replies, strict=True)]

    def claim_replays(self, batches: Sequence[SourceBatch]) -> set[tuple[int, int]]:
        """Claim the orderId of each counted replay; return those (batch, item) another copy counts.

        The first step of ``apply`` (public so that a test can crash between the
        two). Round trip 1 claims (SET NX, then GET the owner) and reads the
        registry; round trip 2 reads every source's R and replayed hash; a third
        moves claims that are stale or were lost (see the module docstring).
        Offsets below the batch's known R are left out: the batch script skips them.
        """
        replays = [_Replay(i, j, batch.source, offset, tag)
                   for i, batch in enumerate(batches) if batch.has_replays
                   for j, (offset, target, _, tag) in enumerate(batch.items)
                   if target >= 0 and tag and offset >= (batch.known_offset or 0)]
        if not replays:
            return set()
        with self._outage():
            return self._claim(replays)

    def _claim(self, replays: list[_Replay]) -> set[tuple[int, int]]:
        claims: list[tuple] = [("SMEMBERS", self.sources_key)]
        for r in replays:
            claims += [("SET", self.claim_key(r.order_id), r.me, "NX"), ("GET", self.claim_key(r.order_id))]
        replies = self._run(claims)
        registered = self._note_registry(replies[0])
        for r, owner in zip(replays, replies[2::2], strict=True):
            r.owner = owner.decode() if owner is not None else ""
        owners = {s for s in (Source.parse(r.owner.rpartition(":")[0]) for r in replays) if s is not None}
        sources = sorted(registered | owners | {r.source for r in replays}, key=str)
        order_ids = sorted({r.order_id for r in replays})
        reads: list[tuple] = []
        for source in sources:  # R first, then the hash: a count seen in R is in the hash read after it
            reads += [("HGET", self.source_key(source), "offset"), ("HMGET", self.replayed_key(source), *order_ids)]
        replies = self._run(reads)
        offsets = {s: (int(r) if r is not None else None) for s, r in zip(sources, replies[0::2], strict=True)}
        holders: dict[str, list[str]] = {}
        for source, held in zip(sources, replies[1::2], strict=True):
            for order_id, offset in zip(order_ids, held, strict=True):
                if offset is not None:
                    holders.setdefault(order_id, []).append(f"{source}:{int(offset)}")
        return self._settle_claims(replays, offsets, holders)

    def _settle_claims(self, replays: list[_Replay], offsets: dict[Source, int | None],
                       holders: dict[str, list[str]]) -> set[tuple[int, int]]:
        losers: set[tuple[int, int]] = set()
        moves: list[tuple[_Replay, str]] = []  # (replay, new owner)
        for r in replays:
            counted_by = [h for h in holders.get(r.order_id, []) if h != r.me]
            if counted_by:
                losers.add((r.batch, r.item))  # another copy counted it
                if r.owner != counted_by[0]:
                    moves.append((r, counted_by[0]))  # the claim was lost: put it back
            elif r.owner != r.me and not self._stale(r.owner, offsets):
                losers.add((r.batch, r.item))
            elif r.owner != r.me:
                moves.append((r, r.me))  # its owner passed that offset without counting it
        if moves:
            moved = self._run([self._script("move", [self.claim_key(r.order_id)], [new, r.owner])
                               for r, new in moves])
            for (r, new), owner in zip(moves, moved, strict=True):
                if new == r.me and owner.decode() != r.me:
                    losers.add((r.batch, r.item))
        return losers

    @staticmethod
    def _stale(owner: str, offsets: dict[Source, int | None]) -> bool:
        """Whether the claim's owner has passed its offset (and, holding no count of it, never counted it)."""
        source_text, _, offset = owner.rpartition(":")
        source = Source.parse(source_text)
        stored = offsets.get(source) if source is not None else None
        return stored is not None and offset.isdigit() and stored > int(offset)

    def touch(self, sources: Sequence[Source], *, worker: str, heartbeat: dict,
              counts: Mapping[str, int] | None = None) -> dict[Source, int | None]:
        """Refresh the worker's heartbeat and registry entries; return each source's stored offset (None: no state).

        ``counts`` (name -> increment) are added to the worker's counters on its
        host (``heartbeat["host"]``) in the same round trip.
        """
        commands: list[tuple] = [("SET", self.heartbeat_key(worker), json.dumps(heartbeat), "PX", HEARTBEAT_TTL_MS)]
        for name, n in (counts or {}).items():
            commands.append(("HINCRBY", self.counters_key(heartbeat["host"]), f"{name}:{worker}", n))
        if sources:
            commands.append(("SADD", self.sources_key, *map(str, sources)))
        commands += [("HGET", self.source_key(s), "offset") for s in sources]
        with self._outage():
            replies = self._run(commands)
        stored = replies[len(commands) - len(sources):]
        return {source: (int(r) if r is not None else None) for source, r in zip(sources, stored, strict=True)}

    def ensure_identity(self, identity: dict[str, str], *, partitions: dict[str, int],
                        force: bool = False, claims: Sequence[str] = ()) -> tuple[int, dict[str, str]]:
        """Tie every source's state to ``identity`` (topic name -> topic id); returns (status, stored identity).

        Status ADOPTED, SAME or RESET (any source reset). A source of another
        incarnation of a topic (or every source, with ``force``) has its state
        deleted: the counts of a topic that no longer exists must not stay in the
        global figures. ``partitions`` (topic -> partition count) names the pool's
        sources, which are registered here; registered sources are checked too.
        ``claims`` names the topics whose ids name the replay claims (default: all):
        the orders and dead-letter topics, not the retry levels, which come and go
        with the backoff settings.
        """
        current = json.dumps(dict(sorted(identity.items())))
        named = {k: v for k, v in sorted(identity.items()) if not claims or k in claims}
        pool = [Source(topic, p) for topic, count in partitions.items() for p in range(count)]
        with self._outage():
            registered = self._note_registry(self._run([("SMEMBERS", self.sources_key)])[0])
            sources = sorted(set(pool) | registered, key=str)
            commands = [self._script("identity", self._state_keys(s), [current, "1" if force else "0"])
                        for s in sources]
            if pool:
                commands.append(("SADD", self.sources_key, *map(str, pool)))
            replies = self._run(commands)[:len(sources)]
        self._identity = current
        self._incarnation = hashlib.sha1(json.dumps(named).encode()).hexdigest()[:16]
        statuses = [int(status) for status, _ in replies]
        if RESET in statuses:
            stored = next(s for status, s in replies if int(status) == RESET)
            return RESET, _identity_of(stored)
        if SAME in statuses:
            return SAME, identity
        return ADOPTED, {}

    def state(self, sources: Sequence[Source]) -> tuple[dict[Source, int | None], dict[Source, dict[int, str]]]:
        """Each source's R and kept decision records (offset -> record), each source read at one instant."""
        with self._outage():
            replies = self._run([self._script("state", [self.source_key(s), self.parked_key(s)], [])
                                 for s in sources])
        offsets = {s: (int(r) if r is not None else None) for s, (r, _) in zip(sources, replies, strict=True)}
        records = {s: _records(_pairs(parked)) for s, (_, parked) in zip(sources, replies, strict=True)}
        return offsets, records

    # -- reads -------------------------------------------------------------------
    def positions(self, sources: Sequence[Source]) -> dict[Source, int | None]:
        """The next offset to count for each source, or None if it has no state."""
        with self._outage():
            replies = self._run([("HGET", self.source_key(s), "offset") for s in sources])
        return {s: (int(r) if r is not None else None) for s, r in zip(sources, replies, strict=True)}

    def totals(self) -> Totals:
        """The global figures, merged from every source's (one round trip, two if a source is new)."""
        states, _ = self._read_sources((), ())
        return _merge(states.values(), 0)[0]

    def snapshot(self, partitions: int, sources: Sequence[Source] = (),
                 workers: Sequence[str] = ()) -> dict:
        """Merged totals, per-partition totals, the positions of ``sources`` and heartbeats.

        One pipeline (on a single server one MULTI, so one consistent view),
        plus one for sources registered since the store last read the registry.
        """
        states, beats = self._read_sources(sources, workers)
        total, parts = _merge(states.values(), partitions)
        src = {s: {k: v for k, v in states.get(s, {}).items()} for s in sources}
        return {"total": total, "partitions": parts, "sources": src, "workers": beats}

    def worker_names(self) -> list[str]:
        """Workers with a live heartbeat key (it expires HEARTBEAT_TTL_MS after the last beat), on every primary."""
        pattern = self.heartbeat_key("*")
        with self._outage():
            client = self._client()
            nodes = ([client.get_redis_connection(n) for n in client.get_primaries()]
                     if isinstance(client, RedisCluster) else [client])
            keys = {_text(key) for node in nodes for key in node.scan_iter(match=pattern, count=1000)}
        return sorted(key[len(pattern) - 1:] for key in keys)

    def _read_sources(self, sources: Sequence[Source],
                      workers: Sequence[str]) -> tuple[dict[Source, dict[str, int]], dict[str, dict | None]]:
        """Every registered source's fields (and ``sources``'), and the workers' heartbeats."""
        with self._outage():
            first = sorted(set(sources) | self._registered, key=str)
            replies = self._run([("SMEMBERS", self.sources_key),
                                 *(("HGETALL", self.source_key(s)) for s in first),
                                 *(("GET", self.heartbeat_key(w)) for w in workers)], consistent=True)
            registered = self._note_registry(replies[0])
            hashes = dict(zip(first, replies[1:1 + len(first)], strict=True))
            beats = {w: (json.loads(r) if r else None) for w, r in zip(workers, replies[1 + len(first):], strict=True)}
            later = sorted(registered - set(first), key=str)
            hashes.update(zip(later, self._run([("HGETALL", self.source_key(s)) for s in later]), strict=True))
        return {s: _numbers(h) for s, h in hashes.items()}, beats

    def _note_registry(self, members: set | list) -> set[Source]:
        parsed = {Source.parse(_text(m)) for m in members}
        self._registered = {s for s in parsed if s is not None}
        return self._registered

    def add_counts(self, host: str, who: str, counts: Mapping[str, int]) -> int:
        """Add to the counters (name -> increment) of ``who`` (a worker or program) on ``host``, one
        round trip; returns the last counter's new value."""
        with self._outage():
            replies = self._run([("HINCRBY", self.counters_key(host), f"{name}:{who}", n)
                                 for name, n in counts.items()])
        return int(replies[-1])

    def counters(self, host: str) -> tuple[dict[tuple[str, str], int], int]:
        """Every counter of ``host`` ((name, worker or program) -> count), and how many dead
        letters were replayed (each once, however often), in one round trip."""
        with self._outage():
            raw, replayed = self._run([("HGETALL", self.counters_key(host)), ("HLEN", self.replays_key)])
        pairs = raw.items() if isinstance(raw, dict) else zip(raw[0::2], raw[1::2], strict=True)
        out = {}
        for field_, value in pairs:
            name, _, who = _text(field_).partition(":")
            out[(name, who)] = int(value)
        return out, int(replayed)

    def record_replays(self, replays: dict[str, dict]) -> None:
        """Remember which dead letters were replayed (id -> details), one round trip."""
        if not replays:
            return
        with self._outage():
            self._client().hset(self.replays_key, mapping={k: json.dumps(v) for k, v in replays.items()})

    def replays(self) -> dict[str, dict]:
        """Every recorded replay: dead letter id -> details."""
        with self._outage():
            raw = self._client().hgetall(self.replays_key)
        return {_text(k): json.loads(v) for k, v in raw.items()}

    # -- writer schemas ----------------------------------------------------------
    # A copy of every writer schema the pool has read, by registry id: a registry
    # that forgets an id (restarted without durable storage, restored from an old
    # backup) must not turn orders already counted into dead letters.
    def keep_schema(self, schema_id: int, schema: str) -> str:
        """Keep ``schema`` as the copy for ``schema_id`` unless one is kept; returns the kept copy."""
        with self._outage():  # a kept copy is never replaced: no transaction needed
            _, kept = self._run([("HSETNX", self.schemas_key, str(schema_id), schema),
                                 ("HGET", self.schemas_key, str(schema_id))])
        return _text(kept)

    def kept_schema(self, schema_id: int) -> str | None:
        """The kept copy of the writer schema ``schema_id``, or None."""
        with self._outage():
            kept = self._client().hget(self.schemas_key, str(schema_id))
        return _text(kept) if kept is not None else None

    def clear(self) -> int:
        """Delete every key of this prefix, on every primary of a cluster (tests and benchmarks)."""
        pattern = "{" + _glob_escape(self._prefix) + "[:}]*"  # {P}:... and {P:...}...
        with self._outage():
            client = self._client()
            if isinstance(client, RedisCluster):
                deleted = sum(int(client.get_redis_connection(node).eval(_CLEAR_EACH_NODE, 0, pattern))
                              for node in client.get_primaries())
            else:
                deleted = int(client.eval(_CLEAR, 0, pattern))
        self._registered = set()
        return deleted


def _records(parked: list[tuple[bytes, float]]) -> dict[int, str]:
    # Members are "<offset>:<record>": unique per offset even where two records read the same.
    return {int(score): member.decode().partition(":")[2] for member, score in parked}


def _text(value: bytes | str) -> str:
    # The client is made with decode_responses=False, so replies are bytes.
    return value.decode() if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _identity_of(stored: bytes | str) -> dict[str, str]:
    text = _text(stored)
    return json.loads(text) if text else {}


def _pairs(reply: list) -> list[tuple[bytes, float]]:
    """ZRANGE ... WITHSCORES as (member, score) pairs (redis-py parses it only when asked by name)."""
    if reply and isinstance(reply[0], (list, tuple)):
        return [(m, float(s)) for m, s in reply]
    return [(reply[i], float(reply[i + 1])) for i in range(0, len(reply), 2)]


def _numbers(raw: dict) -> dict[str, int]:
    """A source hash's numeric fields (all but its identity)."""
    return {_text(k): int(v) for k, v in raw.items() if k != b"identity"}


def _merge(states, partitions: int) -> tuple[Totals, list[Totals]]:
    """The global totals and those of partitions 0..partitions-1, summed over sources' fields."""
    sums: dict[str, int] = {}
    for state in states:
        for name, value in state.items():
            sums[name] = sums.get(name, 0) + value
    total = Totals(sums.get("counted", 0), sums.get("cents", 0), sums.get("dead_lettered", 0),
                   sums.get("retried", 0), sums.get("duplicate_replays", 0))
    parts = [Totals(sums.get(target_field("count", p), 0), sums.get(target_field("cents", p), 0))
             for p in range(partitions)]
    return total, parts
