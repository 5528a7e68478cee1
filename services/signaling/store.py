"""Call state and ephemeral keys: one small Protocol, in memory by default, Redis when
`redis_url` is set (so any signaling replica can end a call another one created)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

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
    `<prefix>ek:<sha256>` with their own expiry, so Redis forgets expired keys itself."""

    def __init__(self, url: str, retention_s: float, prefix: str = "voiceedge:signaling:") -> None:
        import redis.asyncio

        self._redis = redis.asyncio.Redis.from_url(url, socket_timeout=2.0)
        self._retention_ms = max(1, int(retention_s * 1000))
        self._prefix = prefix

    async def put_call(self, call: CallRecord) -> None:
        await self._run(
            self._redis.set(
                f"{self._prefix}call:{call.call_id}", call.to_json(), px=self._retention_ms
            )
        )

    async def get_call(self, call_id: str) -> CallRecord | None:
        raw = await self._run(self._redis.get(f"{self._prefix}call:{call_id}"))
        return None if raw is None else _decode(CallRecord.from_json, raw)

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
