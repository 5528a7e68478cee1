"""The call flow both front ends share: authenticate, rate-limit, route, pick a
transceiver, mint the ufrag, create the session, remember the call; and hang up.

Nothing half-created survives an error: a session created on a transceiver is closed
again if the call cannot be recorded (or the request is cancelled) before the answer
goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format, struct_pb2
from opentelemetry import metrics, trace

from libs.observability.metrics import SIGNALING_CALL_SETUP_DURATION, SIGNALING_CALLS
from libs.observability.telemetry import log_event
from libs.service.auth import internal_channel
from libs.service.errors import StatusError
from libs.wire import ufrag as ufrag_codec
from libs.wire.realtime_session import merge_session
from services.geosteer.client import geosteer_channel
from services.signaling import errors
from services.signaling.ratelimit import RateLimiter, retry_after_header
from services.signaling.sdp import OfferError, SdpFrag, answer_sdpfrag, validate_offer
from services.signaling.settings import SignalingSettings
from services.signaling.store import (
    CALL_CONNECTED,
    CALL_ENDED,
    CallRecord,
    CallStore,
    SecretRecord,
    StoreError,
)
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc
from voiceedge.transceiver.v1 import transceiver_pb2, transceiver_pb2_grpc

logger = logging.getLogger("voiceedge.signaling")

CLIENT_SECRET_PREFIX = "ek_"  # noqa: S105 (a prefix, not a secret)
MIN_SECRET_TTL_S = 10
MAX_SECRET_TTL_S = 7200
# Statuses that are an expected refusal or a transient failure of one transceiver (logged as
# transceiver.refused); any other status is logged as transceiver.create_failed. Either way
# the next ranked transceiver is tried: only INVALID_ARGUMENT (the offer itself is bad) ends
# the attempts at once.
# Statuses of a GetSession that mean "could not reach the transceiver".
# How long a lost node's transceiver is asked for a session's own close reason.
LOST_NODE_QUERY_TIMEOUT_S = 1.0
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_REFUSALS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
}

# What _create_session raises when no transceiver of a cluster took the call: another
# cluster may.
_CLUSTER_REFUSALS = frozenset({"no_capacity", "transceivers_unavailable"})

# A call's StreamSessionEvents stream on its transceiver (the sideband WebSocket's far end).
SidebandCall = grpc.aio.StreamStreamCall[
    transceiver_pb2.StreamSessionEventsRequest, transceiver_pb2.StreamSessionEventsResponse
]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: `owner` is the API key fingerprint calls are filed under."""

    owner: str
    kind: str  # "api_key" or "client_secret"
    bucket: str  # rate-limit bucket of this credential
    bound_session: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class CreatedCall:
    call: CallRecord
    answer_sdp: str


@dataclass(frozen=True, slots=True)
class PatchResult:
    """A PATCH's outcome: the call's ETag (after it), and the answer sdpfrag of an ICE
    restart (None: a trickle-only PATCH, answered 204)."""

    etag: str
    answer_sdpfrag: str | None = None


def etag_of(call: CallRecord) -> str:
    """The strong entity-tag of the call's ICE session (RFC 9725 §4.3.1): its server ufrag,
    which every ICE restart replaces."""
    return f'"{call.ice_ufrag}"'


def if_match_allows(if_match: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.1: `*` or a list holding `etag` (strong comparison: a weak tag never
    matches). No header allows it too: the caller decides whether one is required."""
    if if_match is None:
        return True
    tags = [tag.strip() for tag in if_match.split(",")]
    return "*" in tags or etag in tags


@dataclass(frozen=True, slots=True)
class ClientSecret:
    value: str
    expires_at: float
    session: dict[str, Any]


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _owner(api_key: str) -> str:
    return "key:" + fingerprint(api_key)[:16]


class CallService:
    """One instance per process; both the HTTP and the gRPC front end call into it."""

    def __init__(
        self,
        *,
        api_keys: Sequence[str],
        keyring: ufrag_codec.Keyring,
        store: CallStore,
        settings: SignalingSettings,
        tracer: trace.Tracer | None = None,
        meter: metrics.Meter | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not api_keys:
            raise ValueError("at least one API key is required")
        self._api_keys = [(fingerprint(k).encode(), _owner(k)) for k in api_keys]
        self._keyring = keyring
        self._store = store
        self._settings = settings
        self._tracer = tracer or trace.get_tracer("voiceedge.signaling")
        meter = meter or metrics.get_meter("voiceedge.signaling")
        self._calls_counter = SIGNALING_CALLS.create(meter)
        self._setup_ms = SIGNALING_CALL_SETUP_DURATION.create(meter)
        self._clock = clock
        self._monotonic = monotonic
        self._key_limiter = RateLimiter(settings.rate_per_key_per_s, settings.burst_per_key)
        self._ip_limiter = RateLimiter(settings.rate_per_ip_per_s, settings.burst_per_ip)
        self._geosteer_channel = geosteer_channel(settings.geosteer_address)
        self._geosteer = geosteer_pb2_grpc.GeosteerServiceStub(self._geosteer_channel)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.draining = False
        self._closed = False

    @property
    def geosteer(self) -> Any:
        """The geosteer stub (on an aio channel; grpc-stubs type it as synchronous)."""
        return self._geosteer

    @property
    def settings(self) -> SignalingSettings:
        return self._settings

    # -- authentication and limits -------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Principal:
        """`Bearer <API key | ek_...>` -> Principal; 401 when missing, unknown or expired."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if not authorization or scheme.lower() != "bearer" or not token:
            raise errors.unauthorized(
                "missing_api_key",
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            )
        if not token.isascii() or not token.isprintable():
            # Keys are printable ASCII; aiohttp hands undecodable header bytes through as
            # surrogates, which must be refused here, not crash the hashing below.
            raise errors.unauthorized(
                "invalid_api_key", "Incorrect API key provided: it is not printable ASCII."
            )
        digest = fingerprint(token)
        if token.startswith(CLIENT_SECRET_PREFIX):
            try:
                secret = await self._store.get_secret(digest)
            except StoreError as exc:
                raise self._store_unavailable(exc) from exc
            if secret is None:
                # Expired and unknown look alike on purpose (and in Redis they are alike).
                raise errors.unauthorized(
                    "invalid_api_key", "Unknown or expired client secret provided."
                )
            return Principal(secret.owner, "client_secret", "ek:" + digest, secret.session)
        match = None
        # Constant time over every configured key: compare digests, never stop early.
        for key_digest, owner in self._api_keys:
            if hmac.compare_digest(key_digest, digest.encode()):
                match = owner
        if match is None:
            raise errors.unauthorized("invalid_api_key", "Incorrect API key provided.")
        return Principal(match, "api_key", match)

    def check_ip_rate(self, client_ip: str) -> None:
        if not client_ip:
            return
        wait_s = self._ip_limiter.take(client_ip, self._monotonic())
        if wait_s:
            raise errors.rate_limited(
                "Too many requests from this address.", retry_after_header(wait_s)
            )

    def check_key_rate(self, principal: Principal) -> None:
        wait_s = self._key_limiter.take(principal.bucket, self._monotonic())
        if wait_s:
            raise errors.rate_limited(
                "Rate limit reached for this key.", retry_after_header(wait_s)
            )

    # -- calls ---------------------------------------------------------------------------

    async def create_call(
        self,
        principal: Principal,
        offer_sdp: str | bytes,
        session: dict[str, Any] | None,
        client_ip: str,
    ) -> CreatedCall:
        started = self._monotonic()
        try:
            created = await self._create_call(principal, offer_sdp, session, client_ip)
        except StatusError as exc:
            self._calls_counter.add(1, {"outcome": exc.code})
            raise
        self._calls_counter.add(1, {"outcome": "created"})
        self._setup_ms.record((self._monotonic() - started) * 1000.0)
        return created

    async def _create_call(
        self,
        principal: Principal,
        offer_sdp: str | bytes,
        session: dict[str, Any] | None,
        client_ip: str,
    ) -> CreatedCall:
        try:
            summary = validate_offer(offer_sdp, self._settings.max_body_bytes)
        except OfferError as exc:
            raise errors.bad_request(exc.code, exc.message) from None
        offer_text = offer_sdp.decode("utf-8") if isinstance(offer_sdp, bytes) else offer_sdp
        if self.draining:
            raise errors.unavailable(
                "draining",
                "This signaling node is shutting down; retry.",
                self._settings.retry_after_s,
                exhausted=False,
            )
        # A browser holding an ek_ must not override what its issuer bound to the key: the
        # bound fields go over the offer's session part.
        session_config = merge_session(session or {}, principal.bound_session or {}) or None
        call_id = "rtc_" + secrets.token_hex(12)
        with self._tracer.start_as_current_span(
            "signaling.create_call",
            attributes={
                "call.id": call_id,
                "client.address": client_ip,
                "sdp.audio_sections": summary.audio_sections,
                "sdp.has_datachannel": summary.has_datachannel,
            },
        ) as span:
            route, created = await self._route_and_create(
                call_id, offer_text, session_config, client_ip
            )
            span.set_attribute("cluster.id", route.cluster.cluster_id)
            candidate, ice_ufrag, answer = created
            call = CallRecord(
                call_id=call_id,
                owner=principal.owner,
                cluster_id=route.cluster.cluster_id,
                transceiver_node_id=candidate.node_id,
                transceiver_address=candidate.grpc_address,
                session_id=call_id,
                ice_ufrag=ice_ufrag,
                created_at=self._clock(),
                client_ufrag=summary.ice_ufrag,
            )
            try:
                await self._store.put_call(call)
            except BaseException as exc:
                # Nothing half-created: the session must not outlive a failed request.
                await asyncio.shield(self._close_quietly(candidate.grpc_address, call_id))
                if isinstance(exc, StoreError):
                    raise self._store_unavailable(exc) from exc
                raise
            span.set_attribute("transceiver.node_id", candidate.node_id)
        log_event(
            logger,
            "call.created",
            call__id=call_id,
            session__id=call_id,
            cluster__id=call.cluster_id,
            transceiver__node_id=candidate.node_id,
            client__address=client_ip,
        )
        return CreatedCall(call, answer)

    async def _route_and_create(
        self,
        call_id: str,
        offer_sdp: str,
        session_config: dict[str, Any] | None,
        client_ip: str,
    ) -> tuple[
        geosteer_pb2.RouteSessionResponse, tuple[geosteer_pb2.TransceiverCandidate, str, str]
    ]:
        """Routes and creates the session. When every transceiver of the chosen cluster
        refuses (full since its last heartbeat, or failing), geosteer is asked again without
        that cluster, up to `max_cluster_attempts` clusters; the caller hears the first
        cluster's refusal only when no other cluster takes the call."""
        excluded: list[int] = []
        first_refusal: StatusError | None = None
        while True:
            try:
                route = await self._route(client_ip, excluded)
            except StatusError:
                if first_refusal is not None:
                    raise first_refusal from None
                raise
            try:
                created = await self._create_session(call_id, offer_sdp, session_config, route)
            except StatusError as exc:
                if exc.code not in _CLUSTER_REFUSALS:
                    raise
                first_refusal = first_refusal or exc
                excluded.append(route.cluster.cluster_id)
                log_event(
                    logger,
                    "call.cluster_refused",
                    call__id=call_id,
                    cluster__id=route.cluster.cluster_id,
                    error__code=exc.code,
                )
                if len(excluded) >= self._settings.max_cluster_attempts:
                    raise first_refusal from None
                continue
            return route, created

    async def _route(
        self, client_ip: str, excluded: Sequence[int] = ()
    ) -> geosteer_pb2.RouteSessionResponse:
        request = geosteer_pb2.RouteSessionRequest(client_ip=client_ip)
        request.hints.excluded_cluster_ids.extend(excluded)
        with self._tracer.start_as_current_span("geosteer.route") as span:
            try:
                # Waits (up to the deadline) for a geosteer replica to be connected rather
                # than failing at once: during a replica's failover the other may still be
                # reconnecting.
                route: geosteer_pb2.RouteSessionResponse = await self._geosteer.RouteSession(
                    request,
                    timeout=self._settings.geosteer_timeout_s,
                    wait_for_ready=True,
                )
            except grpc.aio.AioRpcError as exc:
                span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise errors.unavailable(
                        "no_capacity",
                        "No cluster has capacity for a new call; retry later.",
                        self._settings.retry_after_s,
                        exhausted=True,
                    ) from None
                log_event(
                    logger,
                    "geosteer.route_failed",
                    level=logging.WARNING,
                    rpc__grpc__status_code=exc.code().name,
                    error=exc.details(),
                )
                raise errors.unavailable(
                    "routing_unavailable",
                    "Call routing is unavailable; retry later.",
                    self._settings.retry_after_s,
                    exhausted=False,
                ) from None
        if not route.relay_endpoints or not route.transceivers:
            raise errors.unavailable(
                "no_capacity",
                "No cluster has capacity for a new call; retry later.",
                self._settings.retry_after_s,
                exhausted=True,
            )
        return route

    async def _create_session(
        self,
        call_id: str,
        offer_sdp: str,
        session_config: dict[str, Any] | None,
        route: geosteer_pb2.RouteSessionResponse,
    ) -> tuple[geosteer_pb2.TransceiverCandidate, str, str]:
        options = transceiver_pb2.SessionOptions(metadata={"call_id": call_id})
        if session_config:
            options.session_config.CopyFrom(_struct(session_config))
        all_exhausted = True
        for attempt, candidate in enumerate(
            route.transceivers[: self._settings.max_transceiver_attempts]
        ):
            ice_ufrag = ufrag_codec.mint(
                self._keyring, route.cluster.cluster_id, candidate.transceiver_id
            )
            request = transceiver_pb2.CreateSessionRequest(
                session_id=call_id,
                offer_sdp=offer_sdp,
                ice_ufrag=ice_ufrag,
                ice_pwd=ufrag_codec.password(ice_ufrag, self._keyring),
                relay_endpoints=route.relay_endpoints,
                options=options,
            )
            stub = transceiver_pb2_grpc.TransceiverServiceStub(
                self._channel(candidate.grpc_address)
            )
            with self._tracer.start_as_current_span(
                "transceiver.create_session",
                attributes={
                    "transceiver.node_id": candidate.node_id,
                    "server.address": candidate.grpc_address,
                    "attempt": attempt,
                },
            ) as span:
                try:
                    response: transceiver_pb2.CreateSessionResponse = await stub.CreateSession(
                        request, timeout=self._settings.create_session_timeout_s
                    )
                    return candidate, ice_ufrag, response.answer_sdp
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code == grpc.StatusCode.INVALID_ARGUMENT:
                        raise errors.bad_request("invalid_offer", exc.details() or "") from None
                    if code not in _REFUSALS:
                        all_exhausted = False
                        log_event(
                            logger,
                            "transceiver.create_failed",
                            level=logging.WARNING,
                            call__id=call_id,
                            transceiver__node_id=candidate.node_id,
                            rpc__grpc__status_code=code.name,
                        )
                        continue
                    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        all_exhausted = False
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        # It may have created the session after all.
                        await self._close_quietly(candidate.grpc_address, call_id)
                    log_event(
                        logger,
                        "transceiver.refused",
                        call__id=call_id,
                        transceiver__node_id=candidate.node_id,
                        rpc__grpc__status_code=code.name,
                    )
        if all_exhausted:
            raise errors.unavailable(
                "no_capacity",
                "No transceiver has capacity for a new call; retry later.",
                self._settings.retry_after_s,
                exhausted=True,
            )
        raise errors.unavailable(
            "transceivers_unavailable",
            "No transceiver could take the call; retry later.",
            self._settings.retry_after_s,
            exhausted=False,
        )

    async def get_call(self, principal: Principal, call_id: str) -> CallRecord:
        """The call as stored, refreshed from its transceiver while it is not ended."""
        call = await self._owned(principal, call_id)
        if call.state == CALL_ENDED:
            return call
        return await self._refresh(call)

    async def _owned(self, principal: Principal, call_id: str) -> CallRecord:
        call = await self._load(call_id)
        if call.owner != principal.owner:
            raise errors.forbidden("This call belongs to another API key.")
        return call

    async def _refresh(self, call: CallRecord) -> CallRecord:
        """Asks the owning transceiver how the session is. A forgotten session ends the
        call; so does an unreachable transceiver that geosteer has declared dead (missed
        heartbeats). One merely unreachable, or a geosteer that cannot say, leaves the
        stored state as it is: the transceiver may come back."""
        stub = transceiver_pb2_grpc.TransceiverServiceStub(self._channel(call.transceiver_address))
        try:
            info = (
                await stub.GetSession(
                    transceiver_pb2.GetSessionRequest(session_id=call.session_id),
                    timeout=self._settings.create_session_timeout_s,
                )
            ).session
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                updated = call.ended(self._clock(), common_pb2.CLOSE_REASON_INTERNAL_ERROR)
            elif exc.code() in _UNREACHABLE and await self._declared_dead(call):
                updated = call.ended(self._clock(), common_pb2.CLOSE_REASON_NODE_LOST)
                _log_node_lost(updated)
            else:
                return call
        else:
            if info.state == transceiver_pb2.SESSION_STATE_CLOSED:
                updated = call.ended(self._clock(), int(info.stats.close_reason))
            elif info.state == transceiver_pb2.SESSION_STATE_CONNECTED:
                updated = replace(call, state=CALL_CONNECTED)
            else:
                return call
        if updated != call:
            with contextlib.suppress(StoreError):  # the answer stands; the next read retries
                await self._store.put_call(updated)
        return updated

    async def _declared_dead(self, call: CallRecord) -> bool:
        """True when geosteer's live topology no longer holds the call's transceiver;
        False when it does, or when geosteer cannot be asked."""
        try:
            topology = (
                await self._geosteer.ListTopology(
                    geosteer_pb2.ListTopologyRequest(), timeout=self._settings.geosteer_timeout_s
                )
            ).topology
        except grpc.aio.AioRpcError:
            return False
        for cluster in topology.clusters:
            if cluster.cluster_id == call.cluster_id:
                return all(node.node_id != call.transceiver_node_id for node in cluster.nodes)
        return True  # the whole cluster is gone from the configuration

    async def end_calls_on(self, node_id: str) -> int:
        """Transceiver `node_id` left geosteer's topology (declared dead, or deregistered
        after a drain): every live call on it is ended now, not at its next GET. Each asks
        the transceiver once, briefly, for its session's own close reason (a drained node
        still answers while it leaves); unreachable, it is CLOSE_REASON_NODE_LOST. Returns
        how many calls were ended."""
        try:
            calls = await self._store.live_calls_on(node_id)
            ended = await asyncio.gather(*(self._end_lost(call) for call in calls))
            await self._store.forget_node(node_id)
        except StoreError as exc:
            log_event(logger, "store.failed", level=logging.WARNING, error=str(exc))
            return 0
        log_event(logger, "node.lost", transceiver__node_id=node_id, calls_ended=len(ended))
        return len(ended)

    async def _end_lost(self, call: CallRecord) -> CallRecord:
        stub = transceiver_pb2_grpc.TransceiverServiceStub(self._channel(call.transceiver_address))
        reason: int = common_pb2.CLOSE_REASON_NODE_LOST
        with contextlib.suppress(grpc.aio.AioRpcError):
            info = (
                await stub.GetSession(
                    transceiver_pb2.GetSessionRequest(session_id=call.session_id),
                    timeout=LOST_NODE_QUERY_TIMEOUT_S,
                )
            ).session
            if info.state == transceiver_pb2.SESSION_STATE_CLOSED:
                reason = int(info.stats.close_reason)
        ended = call.ended(self._clock(), reason)
        await self._store.put_call(ended)
        _log_node_lost(ended)
        return ended

    async def delete_call(self, principal: Principal, call_id: str) -> CallRecord:
        """Closes the session and marks the call ended; ending an ended call succeeds."""
        call = await self._owned(principal, call_id)
        if call.state == CALL_ENDED:
            return call
        return await self._end(call)

    async def _end(self, call: CallRecord) -> CallRecord:
        """Closes the call's session and records the call as ended."""
        await self._close_quietly(call.transceiver_address, call.session_id)
        ended = call.ended(self._clock(), common_pb2.CLOSE_REASON_CLOSE_RPC)
        try:
            await self._store.put_call(ended)
        except StoreError as exc:
            raise self._store_unavailable(exc) from exc
        log_event(logger, "call.deleted", call__id=call.call_id, session__id=call.session_id)
        return ended

    async def hangup(self, principal: Principal, call_id: str) -> CallRecord:
        """OpenAI's `POST /v1/realtime/calls/{id}/hangup`: like delete_call, but hanging up
        a call that has already ended is an error (OpenAI answers 400), not a no-op."""
        return await self._end(await self._active_call(principal, call_id))

    async def _active_call(self, principal: Principal, call_id: str) -> CallRecord:
        """The caller's call, refreshed from its transceiver; an ended one is an error."""
        call = await self.get_call(principal, call_id)
        if call.state == CALL_ENDED:
            raise errors.call_not_active(call_id)
        return call

    async def open_sideband(self, principal: Principal, call_id: str) -> SidebandCall:
        """The call's event stream on its transceiver (the sideband WebSocket's other end),
        attached: the caller sends client events on it and reads server events."""
        if principal.kind != "api_key":
            raise errors.forbidden("The sideband of a call takes the API key, not a client secret.")
        call = await self._active_call(principal, call_id)
        # Any: grpc-stubs type the call as synchronous, taking a request iterator.
        stub: Any = transceiver_pb2_grpc.TransceiverServiceStub(
            self._channel(call.transceiver_address)
        )
        stream: SidebandCall = stub.StreamSessionEvents()
        try:
            await stream.write(
                transceiver_pb2.StreamSessionEventsRequest(session_id=call.session_id)
            )
        except grpc.aio.AioRpcError as exc:
            stream.cancel()
            raise self._sideband_error(call_id, exc) from None
        log_event(logger, "call.sideband_opened", call__id=call_id, session__id=call.session_id)
        return stream

    def _sideband_error(self, call_id: str, exc: grpc.aio.AioRpcError) -> StatusError:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return errors.call_not_active(call_id)
        return self._transceiver_unreachable()

    def _transceiver_unreachable(self) -> StatusError:
        return errors.unavailable(
            "transceivers_unavailable",
            "The call's transceiver did not answer; retry later.",
            self._settings.retry_after_s,
            exhausted=False,
        )

    async def _load(self, call_id: str) -> CallRecord:
        if not call_id or len(call_id) > 128:
            raise errors.not_found(f"Call '{call_id[:128]}' not found.")
        try:
            call = await self._store.get_call(call_id)
        except StoreError as exc:
            raise self._store_unavailable(exc) from exc
        if call is None:
            raise errors.not_found(f"Call '{call_id}' not found.")
        return call

    # -- ICE restart and trickle (PATCH on the call's URL) ------------------------------

    async def patch_call(
        self, principal: Principal, call_id: str, frag: SdpFrag, if_match: str | None
    ) -> PatchResult:
        """RFC 9725 §4.3: a fragment with new client ICE credentials is an ICE restart (it
        must carry `If-Match: *` or the current ETag); anything else is trickle, accepted
        and not forwarded (the transceiver learns the client as peer-reflexive through the
        relay, so a client's candidates are of no use to it). A stale If-Match is 412."""
        call = await self._owned(principal, call_id)
        if call.state == CALL_ENDED:
            raise errors.call_not_active(call_id)
        etag = etag_of(call)
        restart = frag.ice_pwd is not None and frag.ice_ufrag != call.client_ufrag
        if not if_match_allows(if_match, etag):
            raise errors.precondition(
                "ice_session_changed",
                "If-Match does not name the call's current ICE session (its ETag).",
                412,
            )
        if not restart:
            return PatchResult(etag)
        if if_match is None:
            raise errors.precondition(
                "if_match_required", 'An ICE restart must carry If-Match: "*".', 428
            )
        return await self._restart_ice(call, frag)

    async def _restart_ice(self, call: CallRecord, frag: SdpFrag) -> PatchResult:
        # The new ufrag routes to the same transceiver: the relay reads it from the ufrag.
        token = ufrag_codec.decode(call.ice_ufrag, self._keyring)
        ice_ufrag = ufrag_codec.mint(self._keyring, token.cluster_id, token.transceiver_id)
        ice_pwd = ufrag_codec.password(ice_ufrag, self._keyring)
        stub = transceiver_pb2_grpc.TransceiverServiceStub(self._channel(call.transceiver_address))
        with self._tracer.start_as_current_span(
            "transceiver.restart_ice", attributes={"call.id": call.call_id}
        ) as span:
            try:
                response: transceiver_pb2.RestartIceResponse = await stub.RestartIce(
                    transceiver_pb2.RestartIceRequest(
                        session_id=call.session_id,
                        ice_ufrag=ice_ufrag,
                        ice_pwd=ice_pwd,
                        remote_ice_ufrag=frag.ice_ufrag or "",
                        remote_ice_pwd=frag.ice_pwd or "",
                    ),
                    timeout=self._settings.create_session_timeout_s,
                )
            except grpc.aio.AioRpcError as exc:
                span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
                raise await self._restart_failed(call, exc) from None
        restarted = replace(call, ice_ufrag=ice_ufrag, client_ufrag=frag.ice_ufrag or "")
        try:
            await self._store.put_call(restarted)
        except StoreError as exc:
            raise self._store_unavailable(exc) from exc
        log_event(
            logger,
            "call.ice_restarted",
            call__id=call.call_id,
            session__id=call.session_id,
            ice__ufrag=ice_ufrag,
        )
        answer = answer_sdpfrag(ice_ufrag, ice_pwd, list(response.candidates), frag)
        return PatchResult(etag_of(restarted), answer)

    async def _restart_failed(self, call: CallRecord, exc: grpc.aio.AioRpcError) -> StatusError:
        code = exc.code()
        if code == grpc.StatusCode.NOT_FOUND:
            # The session ended meanwhile: record it, as a GET would.
            await self._refresh(call)
            return errors.call_not_active(call.call_id)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return errors.bad_request("sdp_bad_ice_credentials", exc.details() or "")
        log_event(
            logger,
            "transceiver.restart_failed",
            level=logging.WARNING,
            call__id=call.call_id,
            rpc__grpc__status_code=code.name,
        )
        return self._transceiver_unreachable()

    # -- client secrets ------------------------------------------------------------------

    async def create_client_secret(
        self, principal: Principal, expires_after_s: int, session: dict[str, Any] | None
    ) -> ClientSecret:
        if principal.kind != "api_key":
            raise errors.forbidden("Client secrets cannot mint client secrets; use an API key.")
        ttl_s = expires_after_s or self._settings.client_secret_ttl_s
        if not MIN_SECRET_TTL_S <= ttl_s <= MAX_SECRET_TTL_S:
            raise errors.bad_request(
                "invalid_expires_after",
                f"expires_after.seconds must be {MIN_SECRET_TTL_S} to {MAX_SECRET_TTL_S}.",
            )
        session = {"type": "realtime", **(session or {})}
        if session["type"] != "realtime":
            raise errors.bad_request(
                "invalid_session",
                f"session.type {session['type']!r} is not supported; voiceedge serves 'realtime'.",
            )
        value = CLIENT_SECRET_PREFIX + secrets.token_urlsafe(32)
        expires_at = float(int(self._clock()) + ttl_s)
        record = SecretRecord(principal.owner, expires_at, session)
        try:
            await self._store.put_secret(fingerprint(value), record)
        except StoreError as exc:
            raise self._store_unavailable(exc) from exc
        return ClientSecret(value, expires_at, record.session)

    # -- plumbing ------------------------------------------------------------------------

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = internal_channel(address)
            self._channels[address] = channel
        return channel

    async def _close_quietly(self, address: str, session_id: str) -> None:
        stub = transceiver_pb2_grpc.TransceiverServiceStub(self._channel(address))
        try:
            await stub.CloseSession(
                transceiver_pb2.CloseSessionRequest(session_id=session_id),
                timeout=self._settings.create_session_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log_event(
                    logger,
                    "transceiver.close_failed",
                    level=logging.WARNING,
                    session__id=session_id,
                    rpc__grpc__status_code=exc.code().name,
                )

    def _store_unavailable(self, exc: Exception) -> StatusError:
        log_event(logger, "store.failed", level=logging.WARNING, error=str(exc))
        return errors.unavailable(
            "store_unavailable",
            "Call state is unavailable; retry later.",
            self._settings.retry_after_s,
            exhausted=False,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for channel in [self._geosteer_channel, *self._channels.values()]:
            await channel.close(None)
        self._channels.clear()
        await self._store.close()


def _log_node_lost(call: CallRecord) -> None:
    log_event(
        logger,
        "call.node_lost",
        call__id=call.call_id,
        session__id=call.session_id,
        transceiver__node_id=call.transceiver_node_id,
        close__reason=common_pb2.CloseReason.Name(call.close_reason),  # type: ignore[arg-type]
    )


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(dict(value))
    return message


def struct_to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message)
    return result
