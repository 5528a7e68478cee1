"""A session's lifecycle as a pure state machine: phases, the events that move them, and the
close reason, decided once by the first cause. No I/O, no clock: `Session` feeds it what
aiortc, its timers and the bridge report, and acts on the `Step` it returns.

Everything that decides a session's phase or why it ended lives in this file (as h11's
`_state.py` does for HTTP/1.1): the one `TRANSITIONS` table below, read by `Lifecycle.feed`.

    NEW --check--> CHECKING --ice completed--> ICE_CONNECTED --dtls connected--> CONNECTED
     \\______________\\____________________________\\___________________________\\
                                                           any cause to end --> CLOSING
    CLOSING --teardown done--> CLOSED

    CONNECTED --client silent--> RECONNECTING --path selected (after an ICE restart)--> CONNECTED
    RECONNECTING --grace expired--> CLOSING (client_gone)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from voiceedge.common.v1 import common_pb2
from voiceedge.transceiver.v1 import transceiver_pb2

CR = common_pb2
ST = transceiver_pb2


class Phase(enum.Enum):
    NEW = "new"  # answered; no ICE check has reached us yet
    CHECKING = "checking"  # the client's checks arrive through a relay
    ICE_CONNECTED = "ice_connected"  # ICE completed; DTLS handshaking
    CONNECTED = "connected"  # DTLS keyed SRTP: media and the bridge run
    # Consent expired: media held, the session waits reconnect_grace_s for an ICE restart.
    RECONNECTING = "reconnecting"
    CLOSING = "closing"  # the close reason is decided; resources are being released
    CLOSED = "closed"  # everything released; only the final info is left


class Event(enum.Enum):
    CHECK_RECEIVED = "check_received"  # the mux counted a first packet for the session
    ICE_COMPLETED = "ice_completed"  # iceConnectionState "completed"
    ICE_FAILED = "ice_failed"  # iceConnectionState "failed"
    DTLS_CONNECTED = "dtls_connected"  # connectionState "connected"
    DTLS_FAILED = "dtls_failed"  # connectionState "failed" while ICE has not failed
    PEER_CLOSED = "peer_closed"  # connectionState "closed", consent still fresh
    CONSENT_EXPIRED = "consent_expired"  # connectionState "closed" by the consent loop
    ICE_TIMEOUT = "ice_timeout"  # the session's own ICE timer ran out
    BRIDGE_ENDED = "bridge_ended"  # the bridge ended the session (SessionEnd, half-close)
    BRIDGE_FAILED = "bridge_failed"  # the bridge refused the session or its stream broke
    CLOSE_REQUESTED = "close_requested"  # CloseSession, drain, shutdown, failed set-up
    TEARDOWN_DONE = "teardown_done"  # the session released everything it held
    CLIENT_SILENT = "client_silent"  # consent expired while a reconnect grace applies
    ICE_RESTARTED = "ice_restarted"  # RestartIce installed new ICE credentials
    PATH_SELECTED = "path_selected"  # ICE selected another pair (a restart or a NAT move)
    GRACE_EXPIRED = "grace_expired"  # the reconnect grace timer ran out


class Action(enum.Enum):
    NONE = "none"  # nothing to do (also: an event that no longer matters)
    START_MEDIA = "start_media"  # start our RTP path and open the bridge stream
    TEAR_DOWN = "tear_down"  # release everything, once: the close reason is decided
    FINISHED = "finished"  # teardown is over: report the final state
    AWAIT_RESTART = "await_restart"  # hold media, (re)arm the reconnect grace timer
    RESUME_MEDIA = "resume_media"  # the client is back: stop the timer, media and consent on


class LifecycleError(RuntimeError):
    """An event that cannot happen in the phase it arrived in (a bug in the caller)."""


@dataclass(frozen=True)
class Move:
    """Go to `phase`; `close_reason` set: this event is a cause to end the session."""

    phase: Phase
    action: Action = Action.NONE
    close_reason: int = CR.CLOSE_REASON_UNSPECIFIED


@dataclass(frozen=True)
class Step:
    """What `feed` decided: where the session was, where it is, and what to do about it."""

    before: Phase
    after: Phase
    action: Action


_OPEN = (Phase.NEW, Phase.CHECKING, Phase.ICE_CONNECTED, Phase.CONNECTED)
_BEFORE_ICE = (Phase.NEW, Phase.CHECKING)
_AFTER_ICE = (Phase.ICE_CONNECTED, Phase.CONNECTED)
_ENDED = frozenset((Phase.CLOSING, Phase.CLOSED))  # read on every 20 ms tick: built once
_FROM_AIORTC = (
    Event.ICE_COMPLETED,
    Event.ICE_FAILED,
    Event.DTLS_CONNECTED,
    Event.DTLS_FAILED,
    Event.PEER_CLOSED,
    Event.CONSENT_EXPIRED,
    Event.CLIENT_SILENT,
    Event.PATH_SELECTED,
)


def _close(reason: int) -> Move:
    return Move(Phase.CLOSING, Action.TEAR_DOWN, reason)


def _stay(phase: Phase) -> Move:
    return Move(phase)


def _table() -> dict[tuple[Phase, Event], Move]:
    t: dict[tuple[Phase, Event], Move] = {}
    t[Phase.NEW, Event.CHECK_RECEIVED] = Move(Phase.CHECKING)
    for phase in (Phase.CHECKING, *_AFTER_ICE, Phase.CLOSED):
        t[phase, Event.CHECK_RECEIVED] = _stay(phase)  # only the first one matters
    for phase in _BEFORE_ICE:
        t[phase, Event.ICE_COMPLETED] = Move(Phase.ICE_CONNECTED)
        t[phase, Event.ICE_FAILED] = _close(CR.CLOSE_REASON_ICE_FAILED)
        t[phase, Event.ICE_TIMEOUT] = _close(CR.CLOSE_REASON_ICE_TIMEOUT)
        # aioice's consent loop only runs once ICE connected; before that its "expired"
        # reading means nothing and a closed peer connection is the client hanging up.
        t[phase, Event.CONSENT_EXPIRED] = _close(CR.CLOSE_REASON_CLIENT_HANGUP)
    for phase in _AFTER_ICE:
        t[phase, Event.ICE_COMPLETED] = _stay(phase)
        # ICE that had connected and then failed: consent freshness ended it (RFC 7675).
        t[phase, Event.ICE_FAILED] = _close(CR.CLOSE_REASON_CONSENT_LOST)
        t[phase, Event.ICE_TIMEOUT] = _stay(phase)  # the timer only guards set-up
        t[phase, Event.CONSENT_EXPIRED] = _close(CR.CLOSE_REASON_CONSENT_LOST)
    # DTLS runs over a working ICE pair: connected DTLS implies connected ICE.
    for phase in (*_BEFORE_ICE, Phase.ICE_CONNECTED):
        t[phase, Event.DTLS_CONNECTED] = Move(Phase.CONNECTED, Action.START_MEDIA)
    t[Phase.CONNECTED, Event.DTLS_CONNECTED] = _stay(Phase.CONNECTED)
    for phase in _OPEN:
        t[phase, Event.DTLS_FAILED] = _close(CR.CLOSE_REASON_DTLS_FAILED)
        t[phase, Event.PEER_CLOSED] = _close(CR.CLOSE_REASON_CLIENT_HANGUP)
        t[phase, Event.CLOSE_REQUESTED] = _close(CR.CLOSE_REASON_CLOSE_RPC)  # or the caller's
    # The bridge stream opens once CONNECTED; it cannot end a session before that.
    t[Phase.CONNECTED, Event.BRIDGE_ENDED] = _close(CR.CLOSE_REASON_BRIDGE_ENDED)
    t[Phase.CONNECTED, Event.BRIDGE_FAILED] = _close(CR.CLOSE_REASON_BRIDGE_ERROR)
    _reconnect_rows(t)
    # Closing: the first cause won; later ones (aiortc reporting our own pc.close(), the
    # bridge stream we are ending, a second CloseSession) change nothing.
    for event in Event:
        if event is not Event.TEARDOWN_DONE:
            t[Phase.CLOSING, event] = _stay(Phase.CLOSING)
    t[Phase.CLOSING, Event.TEARDOWN_DONE] = Move(Phase.CLOSED, Action.FINISHED)
    # Closed: timers and the bridge stream were cancelled and awaited, so they report
    # nothing more; aiortc's state reports (its pc is closed) and close requests
    # (CloseSession on a closed session: answered with the final state) change nothing.
    for event in (*_FROM_AIORTC, Event.CLOSE_REQUESTED):
        t[Phase.CLOSED, event] = _stay(Phase.CLOSED)
    return t


def _reconnect_rows(t: dict[tuple[Phase, Event], Move]) -> None:
    """ICE restart and the reconnect grace (RFC 8445 §9, RFC 7675 §5.1): a silent client
    is waited for instead of dropped, and an ICE restart keeps DTLS and everything above."""
    gone = _close(CR.CLOSE_REASON_CLIENT_GONE)
    # Consent checks only run once ICE connected; before media there is nothing to keep.
    t[Phase.ICE_CONNECTED, Event.CLIENT_SILENT] = _close(CR.CLOSE_REASON_CONSENT_LOST)
    t[Phase.CONNECTED, Event.CLIENT_SILENT] = Move(Phase.RECONNECTING, Action.AWAIT_RESTART)
    for phase in _OPEN:
        # Make before break: media stays on the old pair until a new one is selected.
        t[phase, Event.ICE_RESTARTED] = _stay(phase)
        t[phase, Event.PATH_SELECTED] = _stay(phase)
    # A grace timer cancelled as the session resumed may already have fired.
    t[Phase.CONNECTED, Event.GRACE_EXPIRED] = _stay(Phase.CONNECTED)
    r = Phase.RECONNECTING
    for event in (Event.CHECK_RECEIVED, Event.ICE_COMPLETED, Event.DTLS_CONNECTED):
        t[r, event] = _stay(r)
    t[r, Event.ICE_TIMEOUT] = _stay(r)
    t[r, Event.CLIENT_SILENT] = _stay(r)
    # The client is alive (it asked signaling): its new checks get a whole grace again.
    t[r, Event.ICE_RESTARTED] = Move(r, Action.AWAIT_RESTART)
    t[r, Event.PATH_SELECTED] = Move(Phase.CONNECTED, Action.RESUME_MEDIA)
    t[r, Event.GRACE_EXPIRED] = gone
    t[r, Event.ICE_FAILED] = gone
    t[r, Event.CONSENT_EXPIRED] = gone
    t[r, Event.DTLS_FAILED] = _close(CR.CLOSE_REASON_DTLS_FAILED)
    t[r, Event.PEER_CLOSED] = _close(CR.CLOSE_REASON_CLIENT_HANGUP)
    t[r, Event.CLOSE_REQUESTED] = _close(CR.CLOSE_REASON_CLOSE_RPC)
    t[r, Event.BRIDGE_ENDED] = _close(CR.CLOSE_REASON_BRIDGE_ENDED)
    t[r, Event.BRIDGE_FAILED] = _close(CR.CLOSE_REASON_BRIDGE_ERROR)


# (phase, event) -> Move. A pair that is not here cannot happen: feed() raises.
TRANSITIONS: dict[tuple[Phase, Event], Move] = _table()

# The detail recorded with a close reason when the event that caused it came with none.
DETAILS: dict[int, str] = {
    CR.CLOSE_REASON_ICE_FAILED: "ICE checks failed",
    CR.CLOSE_REASON_CONSENT_LOST: "ICE consent expired (RFC 7675)",
    CR.CLOSE_REASON_DTLS_FAILED: "DTLS transport failed",
    CR.CLOSE_REASON_CLIENT_HANGUP: "peer connection closed by the client",
    CR.CLOSE_REASON_CLIENT_GONE: "client silent and no ICE restart within the reconnect grace",
}

# What TransceiverService reports for each phase (CLOSING: the phase it was closed from,
# since the session is not closed until its resources are released).
_PUBLIC_STATE = {
    Phase.NEW: ST.SESSION_STATE_NEW,
    Phase.CHECKING: ST.SESSION_STATE_CONNECTING,
    Phase.ICE_CONNECTED: ST.SESSION_STATE_CONNECTING,
    Phase.CONNECTED: ST.SESSION_STATE_CONNECTED,
    Phase.RECONNECTING: ST.SESSION_STATE_CONNECTING,  # media held until the client is back
    Phase.CLOSED: ST.SESSION_STATE_CLOSED,
}


class Lifecycle:
    """One session's phase and close reason. `feed` is the only way either changes."""

    def __init__(self) -> None:
        self.phase = Phase.NEW
        self._closed_from = Phase.NEW
        self.close_reason: int = CR.CLOSE_REASON_UNSPECIFIED
        self.close_detail = ""

    def feed(self, event: Event, detail: str = "", reason: int | None = None) -> Step:
        """Moves on `event`. `detail` says what happened (kept if this event ends the
        session; empty: DETAILS of its reason); `reason` overrides the table's close
        reason, for CLOSE_REQUESTED only (CloseSession, drain, ... say which). Raises
        LifecycleError for an impossible pair."""
        move = TRANSITIONS.get((self.phase, event))
        if move is None:
            raise LifecycleError(f"{event.value} cannot happen in phase {self.phase.value}")
        if reason is not None and event is not Event.CLOSE_REQUESTED:
            raise LifecycleError(f"{event.value} carries its own close reason")
        before = self.phase
        if move.action is Action.TEAR_DOWN:
            self._closed_from = before
            self.close_reason = reason if reason is not None else move.close_reason
            self.close_detail = detail or DETAILS.get(self.close_reason, "")
        self.phase = move.phase
        return Step(before, move.phase, move.action)

    @property
    def reconnecting(self) -> bool:
        """True while media is held for a silent client (read on every 20 ms tick)."""
        return self.phase is Phase.RECONNECTING

    @property
    def ended(self) -> bool:
        """True from the moment a cause to end the session was fed."""
        return self.phase in _ENDED

    @property
    def public_state(self) -> int:
        """The transceiver.v1 SessionState of this phase."""
        phase = self._closed_from if self.phase is Phase.CLOSING else self.phase
        return _PUBLIC_STATE[phase]
