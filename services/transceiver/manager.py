"""Sessions of one transceiver: admission (max_sessions, draining), lookup, retention of
closed sessions, drain, and the shared bridge streams (BridgeStreams)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from opentelemetry import metrics

from libs.observability.metrics import (
    TRANSCEIVER_CPU,
    TRANSCEIVER_EVENT_LOOP_LAG,
    TRANSCEIVER_SESSIONS_ACTIVE,
    TRANSCEIVER_SESSIONS_CLOSED,
    TRANSCEIVER_SESSIONS_CREATED,
    TRANSCEIVER_SESSIONS_REFUSED,
    TRANSCEIVER_UDPMUX_DROPS,
)
from libs.observability.telemetry import log_event
from libs.service.aio import cancel_and_wait
from libs.service.cpus import cgroup_quota
from libs.service.errors import StatusError, invalid_argument, not_found, resource_exhausted
from services.transceiver import aiortc_compat, rtp, sdp
from services.transceiver.bridge import BridgeStreams
from services.transceiver.call_metrics import CallMetrics, CallRecord
from services.transceiver.looplag import LoopLag, overloaded
from services.transceiver.session import Session, SessionParams, endpoints_of
from services.transceiver.settings import TransceiverSettings
from services.transceiver.udpmux import UdpMux
from voiceedge.common.v1 import common_pb2
from voiceedge.transceiver.v1 import transceiver_pb2

logger = logging.getLogger("voiceedge.transceiver")

# The event loop's lateness is sampled this often, and admission reads the median of the
# last LAG_WINDOW_SAMPLES samples (2 s).
LAG_SAMPLE_INTERVAL_S = 0.1
LAG_WINDOW_SAMPLES = 20


@dataclass(frozen=True)
class ClosedSession:
    """What is retained of a closed session: its final info, none of its resources."""

    id: str
    final_info: transceiver_pb2.SessionInfo

    async def info(self) -> transceiver_pb2.SessionInfo:
        return self.final_info

    def close(self, reason: int, detail: str = "") -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class SessionManager:
    def __init__(
        self, settings: TransceiverSettings, mux: UdpMux, meter: metrics.Meter | None = None
    ) -> None:
        self.settings = settings
        self.mux = mux
        aiortc_compat.index_pc_tasks(asyncio.get_running_loop())
        # One 20 ms send clock for every session's audio; each tick's packets leave together.
        self.pacer = rtp.Pacer(before_tick=mux.hold, after_tick=mux.flush)
        self._open: dict[str, Session] = {}
        self._closed: OrderedDict[str, ClosedSession] = OrderedDict()
        self.bridges = BridgeStreams()
        self.draining = False
        self._drain_deadline: float | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.created_total = 0
        self.on_draining: Callable[[], None] | None = None
        meter = meter or metrics.get_meter("voiceedge.transceiver")
        self._created = TRANSCEIVER_SESSIONS_CREATED.create(meter)
        self._ended = TRANSCEIVER_SESSIONS_CLOSED.create(meter)
        self._refused = TRANSCEIVER_SESSIONS_REFUSED.create(meter)
        # A quota below one core is the whole budget (the process is throttled at it).
        core = min(1.0, cgroup_quota() or 1.0)
        self.loop_lag = LoopLag(LAG_SAMPLE_INTERVAL_S, LAG_WINDOW_SAMPLES, core)
        self.loop_lag.start()
        TRANSCEIVER_EVENT_LOOP_LAG.create(
            meter, [lambda _: [metrics.Observation(self.loop_lag.window.median)]]
        )
        TRANSCEIVER_CPU.create(meter, [lambda _: [metrics.Observation(self.loop_lag.cpu.median)]])
        TRANSCEIVER_SESSIONS_ACTIVE.create(
            meter, [lambda _: [metrics.Observation(len(self._open))]]
        )
        TRANSCEIVER_UDPMUX_DROPS.create(
            meter,
            [
                lambda _: [
                    metrics.Observation(count, {"drop.reason": reason})
                    for reason, count in self.mux.drops.items()
                ]
            ],
        )
        self._call_metrics = CallMetrics(
            meter,
            settings.max_sessions,
            rtt_window=settings.rtt_report_window,
            rtt_min_samples=settings.rtt_report_min_samples,
        )

    @property
    def active(self) -> int:
        return len(self._open)

    @property
    def call_records(self) -> list[CallRecord]:
        """The last call records (call_metrics.py), oldest first."""
        return self._call_metrics.records

    def _params(self, request: transceiver_pb2.CreateSessionRequest) -> SessionParams:
        if not request.session_id:
            raise sdp.SdpError("session_id: required")
        sdp.check_credentials(request.ice_ufrag, request.ice_pwd)
        endpoints = endpoints_of(request.relay_endpoints)
        tcp_endpoints = endpoints_of(request.relay_endpoints, tcp=True)
        for ip, _ in endpoints + tcp_endpoints:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise sdp.SdpError(f"relay_endpoints: {ip!r} is not an IP literal") from None
        options = request.options
        rate = options.output_format.sample_rate_hz or self.settings.sample_rate_hz
        if rate not in (8000, 16000, 24000, 48000):
            raise sdp.SdpError(f"options.output_format.sample_rate_hz: {rate} unsupported")
        if options.output_format.encoding not in (
            common_pb2.AUDIO_ENCODING_UNSPECIFIED,
            common_pb2.AUDIO_ENCODING_PCM_S16LE,
        ) or options.output_format.channels not in (0, 1):
            raise sdp.SdpError("options.output_format: only mono PCM s16le is supported")
        bridge = options.bridge_address or self.settings.bridge_address
        timeout_ms = options.ice_timeout_ms or self.settings.ice_timeout_ms
        return SessionParams(
            session_id=request.session_id,
            ufrag=request.ice_ufrag,
            pwd=request.ice_pwd,
            endpoints=endpoints,
            ice_timeout_s=timeout_ms / 1000.0,
            bridge_address=bridge,
            rate_hz=rate,
            opus_passthrough=options.opus_passthrough,
            metadata=dict(options.metadata),
            session_config=options.session_config if options.HasField("session_config") else None,
            tcp_endpoints=tcp_endpoints,
        )

    def _admit(self) -> None:
        """Refuses a new session (RESOURCE_EXHAUSTED: signaling tries the next transceiver,
        or answers 503 with Retry-After) while draining, full or overloaded."""
        if self.draining:
            raise self._refusal("draining", "transceiver is draining")
        if len(self._open) >= self.settings.max_sessions:
            raise self._refusal("capacity", f"max_sessions ({self.settings.max_sessions}) reached")
        # Before the calls it carries degrade: every one shares this loop and this core.
        limits = (
            (
                self.loop_lag.window,
                self.settings.admission_max_loop_lag_ms,
                "event loop {:.0f} ms late (admission_max_loop_lag_ms {:g})",
            ),
            (
                self.loop_lag.cpu,
                self.settings.admission_max_cpu_percent,
                "process at {:.0f} % of a core (admission_max_cpu_percent {:g})",
            ),
        )
        for window, limit, message in limits:
            if overloaded(window.median, limit):
                raise self._refusal("overloaded", message.format(window.median, limit))

    def _refusal(self, code: str, message: str) -> StatusError:
        self._refused.add(1, {"refusal.reason": code})
        return resource_exhausted(code, message)

    async def create(self, request: transceiver_pb2.CreateSessionRequest) -> str:
        self._admit()
        try:
            params = self._params(request)
        except sdp.SdpError as exc:
            raise invalid_argument("invalid_request", str(exc)) from None
        bridge_wait_s = self.settings.bridge_connect_timeout_s
        if not await self.bridges.reachable(params.bridge_address, bridge_wait_s):
            # The call could not reach an agent: refused, so signaling tries another
            # transceiver or answers 503 with Retry-After, instead of a call that ends at once.
            self._refused.add(1, {"refusal.reason": "bridge_unavailable"})
            raise StatusError(
                grpc.StatusCode.UNAVAILABLE,
                "bridge_unavailable",
                f"inference bridge {params.bridge_address} is unreachable",
            )
        self._admit()  # again: other sessions may have been admitted during the wait
        if params.session_id in self._open or params.session_id in self._closed:
            raise StatusError(
                grpc.StatusCode.ALREADY_EXISTS,
                "session_exists",
                f"session_id {params.session_id!r} exists",
            )
        self._check_ufrag_free(params.ufrag)
        created_at = time.monotonic()
        session = Session(
            params, self.settings, self.mux, self.bridges, self.pacer, self._session_closed
        )
        self._open[session.id] = session  # holds the slot across the awaits below
        self._idle.clear()
        try:
            answer = await session.negotiate(request.offer_sdp)
        except BaseException as exc:
            await session.close(common_pb2.CLOSE_REASON_INTERNAL_ERROR, "negotiation failed")
            self._closed.pop(session.id, None)
            if isinstance(exc, sdp.SdpError):
                raise invalid_argument("invalid_offer", str(exc)) from None
            raise
        self.created_total += 1
        self._created.add(1)
        self._call_metrics.watch(session, created_at)
        session.first_hop_rtt_ms = functools.partial(
            self._call_metrics.first_hop_rtt_ms, session.id
        )
        log_event(
            logger,
            "session.created",
            session__id=session.id,
            ice__ufrag=params.ufrag,
            bridge=params.bridge_address,
        )
        return answer

    def _check_ufrag_free(self, ufrag: str, owner: Session | None = None) -> None:
        if any(s.params.ufrag == ufrag for s in self._open.values() if s is not owner):
            raise StatusError(
                grpc.StatusCode.ALREADY_EXISTS,
                "ufrag_in_use",
                "ice_ufrag already in use by another session",
            )

    def _session_closed(self, session: Session) -> None:
        self._open.pop(session.id, None)
        reason = common_pb2.CloseReason.Name(session.close_reason)  # type: ignore[arg-type]
        self._ended.add(1, {"close.reason": reason})
        self._call_metrics.closed(session.id)
        retain = self.settings.closed_sessions_retained
        if retain and session.final_info is not None:
            self._closed[session.id] = ClosedSession(session.id, session.final_info)
            while len(self._closed) > retain:
                self._closed.popitem(last=False)
        if not self._open:
            self._idle.set()

    def find(self, session_id: str) -> Session | ClosedSession:
        session = self._open.get(session_id) or self._closed.get(session_id)
        if session is None:
            raise not_found("session_not_found", f"no session {session_id!r}")
        return session

    async def restart_ice(
        self, request: transceiver_pb2.RestartIceRequest
    ) -> transceiver_pb2.RestartIceResponse:
        """RestartIce: the open session takes the new credentials (see Session.restart_ice)."""
        session = self.find(request.session_id)
        if not isinstance(session, Session) or session.is_closed:
            raise not_found("session_not_found", f"session {request.session_id!r} ended")
        try:
            sdp.check_credentials(request.ice_ufrag, request.ice_pwd)
            sdp.check_credentials(request.remote_ice_ufrag, request.remote_ice_pwd)
        except sdp.SdpError as exc:
            raise invalid_argument("invalid_request", str(exc)) from None
        self._check_ufrag_free(request.ice_ufrag, session)
        credentials = aiortc_compat.IceCredentials(
            request.ice_ufrag, request.ice_pwd, request.remote_ice_ufrag, request.remote_ice_pwd
        )
        try:
            session.restart_ice(credentials)
        except ValueError as exc:
            raise not_found("session_not_found", str(exc)) from None
        return transceiver_pb2.RestartIceResponse(
            session=await session.info(), candidates=session.answer_candidates
        )

    async def close(self, session_id: str, reason: int) -> transceiver_pb2.SessionInfo:
        session = self.find(session_id)
        await session.close(reason, "close requested")
        return await session.info()

    async def list(
        self, page_size: int, page_token: str
    ) -> tuple[list[Session | ClosedSession], str]:
        size = min(page_size or 100, 1000)
        ids = sorted({*self._open, *self._closed})
        ids = [i for i in ids if i > page_token] if page_token else ids
        page = ids[:size]
        token = page[-1] if len(ids) > size else ""
        return [self.find(i) for i in page], token

    async def drain(self, grace_s: float) -> int:
        """Refuses new sessions from now on; closes what is left after `grace_s` (a second
        call may only shorten it). Returns the sessions open when it was called."""
        self.draining = True
        if self.on_draining is not None:
            self.on_draining()
        active = len(self._open)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        if self._drain_deadline is None or deadline < self._drain_deadline:
            self._drain_deadline = deadline
            if self._drain_task is not None:
                self._drain_task.cancel()
            self._drain_task = loop.create_task(self._drain_after(grace_s))
        log_event(logger, "transceiver.draining", active_sessions=active, grace_s=grace_s)
        return active

    async def _drain_after(self, grace_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
            return
        await self.close_all(common_pb2.CLOSE_REASON_DRAINED)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def close_all(self, reason: int) -> None:
        """Closes every open session and waits for each teardown to finish. Cancelling this
        (the drain timer, when shutdown overtakes it) cancels the waiting only: a teardown
        stopped halfway would leave the caller untold and no `session.closed` logged."""
        tasks = [s.close(reason, "transceiver shutting down") for s in list(self._open.values())]
        if tasks:
            await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)

    async def shutdown(self) -> None:
        await self.loop_lag.close()
        await cancel_and_wait(self._drain_task)
        await self.close_all(common_pb2.CLOSE_REASON_DRAINED)
        await self.bridges.close()
        self.pacer.close()
        await self.mux.close()
