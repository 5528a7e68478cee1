"""Call state and ephemeral keys: one small Protocol, in memory by default, Redis when
`redis_url` is set (so any signaling replica can end a call another one created)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

# Retries of a Redis command whose connection broke (Redis restarted): 20 ms, then 40 ms.
REDIS_RETRY_BASE_S = 0.02
REDIS_RETRY_CAP_S = 0.2

CALL_CONNECTING = "connecting"
CALL_CONNECTED = "connected"
CALL_ENDED = "ended"


@dataclass(frozen=True, slots=True)
class CallRecord:
    """call id -> where its session lives."""

    call_id: str
    owner: str  # principal that created it (API key fingerprint)
    cluster_id: int
    transceiver_node_id: str
    transceiver_address: str
    session_id: str
    ice_ufrag: str
    created_at: float
    state: str = CALL_CONNECTING
    ended_at: float = 0.0
    close_reason: int = 0  # voiceedge.common.v1.CloseReason
    client_ufrag: str = ""  # the client's current ICE ufrag (tells a restart from trickle)

    def ended(self, at: float, reason: int) -> CallRecord:
        return replace(self, state=CALL_ENDED, ended_at=at, close_reason=reason)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> CallRecord:
        return cls(**json.loads(text))


@dataclass(frozen=True, slots=True)
class SecretRecord:
    """An ephemeral key ("ek_..."), stored under the SHA-256 of its value."""

    owner: str
    expires_at: float
    session: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> SecretRecord:
        return cls(**json.loads(text))


class StoreError(Exception):
    """The store could not be reached or answered garbage."""


class CallStore(Protocol):
    async def put_call(self, call: CallRecord) -> None: ...

    async def get_call(self, call_id: str) -> CallRecord | None: ...

    async def live_calls_on(self, node_id: str) -> list[CallRecord]:
        """Calls not ended whose session is on transceiver `node_id`."""
        ...

    async def forget_node(self, node_id: str) -> None:
        """Drops what indexes calls by `node_id` (the node is gone, its calls ended)."""
        ...

    async def put_secret(self, digest: str, secret: SecretRecord) -> None: ...

    async def get_secret(self, digest: str) -> SecretRecord | None: ...

    async def close(self) -> None: ...


class MemoryCallStore:
    """Single-process store; records are dropped `retention_s` after creation, and the
    oldest first beyond `max_records`."""

    def __init__(
        self, retention_s: float = 86400.0, max_records: int = 1_000_000, clock: Any = time.time
    ) -> None:
        self._retention_s = retention_s
        self._max = max_records
        self._clock = clock
        self._calls: OrderedDict[str, CallRecord] = OrderedDict()
        self._secrets: OrderedDict[str, SecretRecord] = OrderedDict()

    def _expire(self) -> None:
        horizon = self._clock() - self._retention_s
        while self._calls:
            oldest = next(iter(self._calls.values()))
            if oldest.created_at >= horizon and len(self._calls) <= self._max:
                break
            self._calls.popitem(last=False)
        now = self._clock()
        while self._secrets:
            oldest_secret = next(iter(self._secrets.values()))
            if oldest_secret.expires_at > now and len(self._secrets) <= self._max:
                break
            self._secrets.popitem(last=False)

    async def put_call(self, call: CallRecord) -> None:
        self._calls[call.call_id] = call
        self._expire()

    async def get_call(self, call_id: str) -> CallRecord | None:
        return self._calls.get(call_id)

    async def live_calls_on(self, node_id: str) -> list[CallRecord]:
        # Only when a node is lost: a scan of this process's records is cheap enough.
        return [
            c
            for c in self._calls.values()
            if c.transceiver_node_id == node_id and c.state != CALL_ENDED
        ]

    async def forget_node(self, node_id: str) -> None:
        return None

    async def put_secret(self, digest: str, secret: SecretRecord) -> None:
        self._secrets[digest] = secret
        self._expire()

    async def get_secret(self, digest: str) -> SecretRecord | None:
        secret = self._secrets.get(digest)
        if secret is None or secret.expires_at <= self._clock():
            return None
        return secret

    async def close(self) -> None:
        return None


class RedisCallStore:
    """Calls as JSON strings under `<prefix>call:<id>` (TTL retention_s), secrets under
    `<prefix>ek:<sha256>` with their own expiry, so Redis forgets expired keys itself. The
    ids of each transceiver's live calls are a set under `<prefix>node:<node id>` (TTL
    retention_s from its last change), so a lost node's calls can be ended at once."""

    def __init__(self, url: str, retention_s: float, prefix: str = "voiceedge:signaling:") -> None:
        import redis.asyncio
        import redis.exceptions
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        # A restarted Redis closes every pooled connection: the first command on each would
        # fail (a 503) without a retry on a new one. Every write here is idempotent.
        self._redis = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=2.0,
            retry=Retry(ExponentialBackoff(cap=REDIS_RETRY_CAP_S, base=REDIS_RETRY_BASE_S), 2),
            retry_on_error=[redis.exceptions.ConnectionError],
        )
        self._retention_ms = max(1, int(retention_s * 1000))
        self._prefix = prefix

    def _node_key(self, node_id: str) -> str:
        return f"{self._prefix}node:{node_id}"

    async def put_call(self, call: CallRecord) -> None:
        node = self._node_key(call.transceiver_node_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(f"{self._prefix}call:{call.call_id}", call.to_json(), px=self._retention_ms)
        if call.state == CALL_ENDED:
            pipe.srem(node, call.call_id)
        else:
            pipe.sadd(node, call.call_id)
            pipe.pexpire(node, self._retention_ms)
        await self._run(pipe.execute())

    async def get_call(self, call_id: str) -> CallRecord | None:
        raw = await self._run(self._redis.get(f"{self._prefix}call:{call_id}"))
        return None if raw is None else _decode(CallRecord.from_json, raw)

    async def live_calls_on(self, node_id: str) -> list[CallRecord]:
        ids = sorted(await self._run(self._redis.smembers(self._node_key(node_id))))
        if not ids:
            return []
        keys = [f"{self._prefix}call:{i.decode() if isinstance(i, bytes) else i}" for i in ids]
        raws = await self._run(self._redis.mget(keys))
        calls = [_decode(CallRecord.from_json, raw) for raw in raws if raw is not None]
        return [c for c in calls if c.state != CALL_ENDED]

    async def forget_node(self, node_id: str) -> None:
        await self._run(self._redis.delete(self._node_key(node_id)))

    async def put_secret(self, digest: str, secret: SecretRecord) -> None:
        ttl_ms = int((secret.expires_at - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        await self._run(self._redis.set(f"{self._prefix}ek:{digest}", secret.to_json(), px=ttl_ms))

    async def get_secret(self, digest: str) -> SecretRecord | None:
        raw = await self._run(self._redis.get(f"{self._prefix}ek:{digest}"))
        if raw is None:
            return None
        secret = _decode(SecretRecord.from_json, raw)
        return secret if secret.expires_at > time.time() else None

    async def close(self) -> None:
        await self._redis.aclose()

    async def _run(self, awaitable: Any) -> Any:
        import redis.exceptions

        try:
            return await awaitable
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc


def _decode(parse: Any, raw: bytes) -> Any:
    try:
        return parse(raw)
    except (ValueError, TypeError) as exc:
        raise StoreError(f"corrupt record: {exc}") from exc


def make_store(redis_url: str, retention_s: float) -> CallStore:
    """The one place that picks the implementation."""
    if redis_url:
        return RedisCallStore(redis_url, retention_s)
    return MemoryCallStore(retention_s)
