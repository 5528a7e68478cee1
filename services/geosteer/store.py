"""Where node records live: one small Protocol, in memory by default, Redis when `redis_url`
is set (so several geosteer replicas serve one registry).

The store also carries what replicas must agree on besides the records: the topology
revision (`changed`), and the RTT reports each replica receives (`share_rtt`), which every
other replica folds into its own table. `follow` delivers other replicas' changes.

Redis layout (prefix `voiceedge:geosteer:`):

    nodes     hash    node id -> the record (JSON, lease deadline as Unix time)
    leases    zset    node id -> lease deadline (Unix seconds): what a sweep expires
    claims    hash    "<cluster>:<transceiver id>" -> the node id that registered it last
    revision  string  changes so far (INCR on every change); the revision is 1 + this,
                      as a registry of one process starts at 1
    events    pub/sub {"o": origin, "r": revision} or {"o": origin, "c": cluster, "s": [...]}

A transceiver registers with one Lua script (`REGISTER_LUA`) that checks the claim and
writes the record and lease together, so two nodes claiming one transceiver id through two
replicas at once cannot both win: Redis runs one script at a time.

Nothing lives without an expiry: `nodes`, `leases` and `claims` expire KEY_GRACE_S after the last
lease written ends (all of them have run out by then), `revision` REVISION_TTL_S after a
replica last read or changed it (only a registry with no replica running for that long
starts counting again).

Lease deadlines are Unix time in Redis, so replicas on different hosts agree on them
(NTP-synchronised clocks); each replica converts them to and from its own monotonic clock
at this edge. Pub/sub is at most once: a replica that missed a notice (its connection
broke) reads the revision again every `poll_s`, which bounds how late it can learn a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from libs.observability.telemetry import log_event
from libs.service.errors import StatusError
from services.geosteer.selection import Endpoint, NodeKind, NodeState

logger = logging.getLogger("voiceedge.geosteer.store")

KEY_PREFIX = "voiceedge:geosteer:"
REDIS_RETRY_BASE_S = 0.02
REDIS_RETRY_CAP_S = 0.2
FOLLOW_MAX_BACKOFF_S = 5.0
KEY_GRACE_S = 60.0
REVISION_TTL_S = 86_400

# KEYS: nodes, leases; ARGV: node id, now (Unix s). Deletes only a lease that ran out, so a
# replica sweeping a stale read never removes a node another replica just renewed.
DELETE_EXPIRED_LUA = """
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
if deadline and tonumber(deadline) <= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS: nodes, leases, claims; ARGV: node id, record, lease deadline (Unix s), key lifetime
# (ms), claim field ("" for a node that claims nothing), cluster id, transceiver id, now
# (Unix s). Writes the record and its lease unless another node holds the claim: a node
# whose lease still runs and whose record still names that cluster and transceiver id (a
# holder that re-registered under another id, or ran out, holds nothing). Returns the
# holder's id when refused, else "".
REGISTER_LUA = """
if ARGV[5] ~= '' then
  local holder = redis.call('HGET', KEYS[3], ARGV[5])
  if holder and holder ~= ARGV[1] then
    local deadline = redis.call('ZSCORE', KEYS[2], holder)
    local raw = redis.call('HGET', KEYS[1], holder)
    if deadline and raw and tonumber(deadline) > tonumber(ARGV[8]) then
      local ok, record = pcall(cjson.decode, raw)
      if ok and type(record) == 'table' and record['kind'] == 2
          and tostring(record['cluster']) == ARGV[6]
          and tostring(record['transceiver']) == ARGV[7] then
        return holder
      end
    end
  end
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return ''
"""


def claim_of(node: NodeState) -> str:
    """The claim a registration makes: a transceiver's (cluster, transceiver id), which
    the ufrag carries and so must name one live node; "" for every other kind."""
    if node.kind is NodeKind.TRANSCEIVER:
        return f"{node.cluster_id}:{node.transceiver_id}"
    return ""


def holds_claim(node: NodeState, claim: str, now: float) -> bool:
    return claim != "" and claim_of(node) == claim and node.is_live(now)


@dataclass(frozen=True)
class RttReport:
    client_prefix: str
    rtt_ms: float
    sample_count: int


@dataclass(frozen=True)
class StoreEvent:
    """Another replica's change: a topology revision, or RTT reports it received."""

    revision: int = 0  # 0: none
    cluster_id: int = 0
    samples: tuple[RttReport, ...] = ()


class NodeStore(Protocol):
    """Where node records live. All methods are coroutines so a networked store fits; a
    store that cannot be reached raises StatusError UNAVAILABLE (`registry_unavailable`)."""

    async def put(self, node: NodeState) -> None: ...

    async def register(self, node: NodeState, now: float) -> str:
        """Puts `node` unless another live node holds its claim (`claim_of`), checked and
        written in one step; returns that holder's id when refused, else ""."""
        ...

    async def get(self, node_id: str) -> NodeState | None: ...

    async def delete(self, node_id: str) -> bool: ...

    async def delete_expired(self, node_id: str, now: float) -> bool:
        """Removes the node only if its stored lease ran out by `now` (monotonic)."""
        ...

    async def all(self) -> list[NodeState]: ...

    async def changed(self) -> int:
        """The next topology revision (after a change), announced to every replica."""
        ...

    async def share_rtt(self, cluster_id: int, samples: Sequence[RttReport]) -> None: ...

    async def follow(self, on_event: Callable[[StoreEvent], None]) -> None:
        """Hands other replicas' changes to `on_event` until cancelled."""
        ...

    async def close(self) -> None: ...


class InMemoryNodeStore:
    """The single-process store (dev, tests, one geosteer replica)."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeState] = {}
        self._revision = 1

    async def put(self, node: NodeState) -> None:
        self._nodes[node.node_id] = node

    async def register(self, node: NodeState, now: float) -> str:
        # No await between the check and the write: one event loop makes it one step.
        claim = claim_of(node)
        for other in self._nodes.values():
            if other.node_id != node.node_id and holds_claim(other, claim, now):
                return other.node_id
        self._nodes[node.node_id] = node
        return ""

    async def get(self, node_id: str) -> NodeState | None:
        return self._nodes.get(node_id)

    async def delete(self, node_id: str) -> bool:
        return self._nodes.pop(node_id, None) is not None

    async def delete_expired(self, node_id: str, now: float) -> bool:
        node = self._nodes.get(node_id)
        if node is None or node.is_live(now):
            return False
        del self._nodes[node_id]
        return True

    async def all(self) -> list[NodeState]:
        return list(self._nodes.values())

    async def changed(self) -> int:
        self._revision += 1
        return self._revision

    async def share_rtt(self, cluster_id: int, samples: Sequence[RttReport]) -> None:
        return None  # no other replica

    async def follow(self, on_event: Callable[[StoreEvent], None]) -> None:
        return None

    async def close(self) -> None:
        return None


def _endpoint(value: Any) -> Endpoint:
    ip, port, tcp = value
    if not (isinstance(ip, str) and isinstance(port, int) and isinstance(tcp, bool)):
        raise ValueError(f"bad endpoint {value!r}")
    return Endpoint(ip, port, tcp)


def encode_node(node: NodeState, expires_unix: float) -> str:
    """A record as Redis holds it; `expires_unix` replaces the monotonic lease deadline."""
    media = node.media_address
    return json.dumps(
        {
            "id": node.node_id,
            "kind": int(node.kind),
            "cluster": node.cluster_id,
            "expires": expires_unix,
            "transceiver": node.transceiver_id,
            "grpc": node.grpc_address,
            "media": None if media is None else [media.ip, media.port, media.tcp],
            "public": [[e.ip, e.port, e.tcp] for e in node.public_endpoints],
            "capacity": node.capacity_sessions,
            "active": node.active_sessions,
            "draining": node.draining,
            "version": node.version,
            "cpu": node.cpu_load,
            "heartbeat": node.last_heartbeat_unix,
        },
        separators=(",", ":"),
    )


def decode_node(text: str | bytes, expires_at: Callable[[float], float]) -> NodeState:
    """The record back; `expires_at` maps the stored Unix deadline to this process's clock.
    ValueError if it is not a record."""
    try:
        data = json.loads(text)
        media = data["media"]
        expires = float(data["expires"])
        if not math.isfinite(expires):
            raise ValueError("bad lease deadline")
        return NodeState(
            node_id=str(data["id"]),
            kind=NodeKind(int(data["kind"])),
            cluster_id=int(data["cluster"]),
            expires_at=expires_at(expires),
            transceiver_id=int(data["transceiver"]),
            grpc_address=str(data["grpc"]),
            media_address=None if media is None else _endpoint(media),
            public_endpoints=tuple(_endpoint(e) for e in data["public"]),
            capacity_sessions=int(data["capacity"]),
            active_sessions=int(data["active"]),
            draining=bool(data["draining"]),
            version=str(data["version"]),
            cpu_load=float(data["cpu"]),
            last_heartbeat_unix=float(data["heartbeat"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad node record: {exc}") from None


def decode_event(text: str | bytes) -> tuple[str, StoreEvent]:
    """(origin, event) of a published notice; ValueError if it is not one."""
    try:
        data = json.loads(text)
        samples = (
            tuple(
                RttReport(str(prefix), float(rtt), int(count)) for prefix, rtt, count in data["s"]
            )
            if "s" in data
            else ()
        )
        return str(data["o"]), StoreEvent(int(data.get("r", 0)), int(data.get("c", 0)), samples)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad event: {exc}") from None


def unavailable(exc: BaseException) -> StatusError:
    return StatusError(
        grpc.StatusCode.UNAVAILABLE, "registry_unavailable", f"node registry (redis): {exc}"
    )


class RedisNodeStore:
    """The registry every replica on one Redis shares (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 2.0,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        prefix: str = KEY_PREFIX,
    ) -> None:
        import redis.asyncio
        import redis.exceptions
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        # A restarted Redis closes every pooled connection; every command here is safe to
        # send again on a new one.
        self._redis = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=REDIS_RETRY_CAP_S, base=REDIS_RETRY_BASE_S), 2),
            retry_on_error=[redis.exceptions.ConnectionError],
        )
        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._poll_s = poll_s
        self._clock = clock
        self._wall = wall_clock
        self._nodes = f"{prefix}nodes"
        self._leases = f"{prefix}leases"
        self._revision = f"{prefix}revision"
        self._channel = f"{prefix}events"
        # Tells this replica's own notices from the others' (it applied them already).
        self.origin = secrets.token_hex(8)
        self._claims = f"{prefix}claims"
        self._delete_expired = self._redis.register_script(DELETE_EXPIRED_LUA)
        self._register = self._redis.register_script(REGISTER_LUA)
        self.bad_records = 0

    def _to_unix(self, monotonic: float) -> float:
        return monotonic - self._clock() + self._wall()

    def _from_unix(self, unix: float) -> float:
        return unix - self._wall() + self._clock()

    async def _run(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except self._errors as exc:
            raise unavailable(exc) from exc

    def _decode(self, node_id: object, raw: str | bytes) -> NodeState | None:
        try:
            return decode_node(raw, self._from_unix)
        except ValueError as exc:
            self.bad_records += 1
            log_event(
                logger, "registry.bad_record", level=logging.WARNING, node__id=node_id, error=exc
            )
            return None

    async def put(self, node: NodeState) -> None:
        expires = self._to_unix(node.expires_at)
        keep_ms = max(1, int((node.expires_at - self._clock() + KEY_GRACE_S) * 1000))
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._nodes, node.node_id, encode_node(node, expires))
        pipe.zadd(self._leases, {node.node_id: expires})
        pipe.pexpire(self._nodes, keep_ms)
        pipe.pexpire(self._leases, keep_ms)
        pipe.pexpire(self._claims, keep_ms)  # a live holder's claim outlives its lease
        await self._run(pipe.execute())

    async def register(self, node: NodeState, now: float) -> str:
        expires = self._to_unix(node.expires_at)
        keep_ms = max(1, int((node.expires_at - self._clock() + KEY_GRACE_S) * 1000))
        holder = await self._run(
            self._register(
                keys=[self._nodes, self._leases, self._claims],
                args=[
                    node.node_id,
                    encode_node(node, expires),
                    expires,
                    keep_ms,
                    claim_of(node),
                    node.cluster_id,
                    node.transceiver_id,
                    self._to_unix(now),
                ],
            )
        )
        return holder.decode() if isinstance(holder, bytes) else str(holder or "")

    async def get(self, node_id: str) -> NodeState | None:
        raw = await self._run(self._redis.hget(self._nodes, node_id))
        return None if raw is None else self._decode(node_id, raw)

    async def delete(self, node_id: str) -> bool:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hdel(self._nodes, node_id)
        pipe.zrem(self._leases, node_id)
        removed, _ = await self._run(pipe.execute())
        return bool(removed)

    async def delete_expired(self, node_id: str, now: float) -> bool:
        done = await self._run(
            self._delete_expired(
                keys=[self._nodes, self._leases], args=[node_id, self._to_unix(now)]
            )
        )
        return bool(done)

    async def all(self) -> list[NodeState]:
        raw: dict[Any, Any] = await self._run(self._redis.hgetall(self._nodes))
        nodes = (self._decode(node_id, value) for node_id, value in raw.items())
        return [n for n in nodes if n is not None]

    async def _publish(self, fields: dict[str, object]) -> None:
        await self._run(
            self._redis.publish(self._channel, json.dumps({"o": self.origin, **fields}))
        )

    async def changed(self) -> int:
        pipe = self._redis.pipeline(transaction=True)
        pipe.incr(self._revision)
        pipe.expire(self._revision, REVISION_TTL_S)
        count, _ = await self._run(pipe.execute())
        revision = 1 + int(count)
        await self._publish({"r": revision})
        return revision

    async def share_rtt(self, cluster_id: int, samples: Sequence[RttReport]) -> None:
        if samples:
            await self._publish(
                {
                    "c": cluster_id,
                    "s": [[s.client_prefix, s.rtt_ms, s.sample_count] for s in samples],
                }
            )

    async def revision(self) -> int:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._revision)
        pipe.expire(self._revision, REVISION_TTL_S)
        count, _ = await self._run(pipe.execute())
        return 1 + int(count or 0)

    async def follow(self, on_event: Callable[[StoreEvent], None]) -> None:
        """Subscribes, catches up on the revision, then hands on every other replica's
        notice; re-reads the revision every `poll_s` without one. Reconnects with backoff."""
        backoff_s = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await self._run(pubsub.subscribe(self._channel))
                on_event(StoreEvent(revision=await self.revision()))
                backoff_s = 0.1
                while True:
                    message = await self._run(pubsub.get_message(timeout=self._poll_s))
                    if message is None:
                        on_event(StoreEvent(revision=await self.revision()))
                        continue
                    try:
                        origin, event = decode_event(message["data"])
                    except ValueError as exc:
                        log_event(logger, "registry.bad_event", level=logging.WARNING, error=exc)
                        continue
                    if origin != self.origin:
                        on_event(event)
            except StatusError as exc:
                log_event(logger, "registry.follow_broken", level=logging.WARNING, error=exc)
            finally:
                with contextlib.suppress(*self._errors):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff_s)
            backoff_s = min(FOLLOW_MAX_BACKOFF_S, backoff_s * 2)

    async def close(self) -> None:
        with contextlib.suppress(*self._errors):
            await self._redis.aclose()


def make_node_store(
    redis_url: str,
    *,
    timeout_s: float = 2.0,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> NodeStore:
    """The one place that picks the store: Redis when `redis_url` is set."""
    if redis_url:
        return RedisNodeStore(
            redis_url, timeout_s=timeout_s, poll_s=poll_s, clock=clock, wall_clock=wall_clock
        )
    return InMemoryNodeStore()
