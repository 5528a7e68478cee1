"""The session lifecycle table (lifecycle.py): every (phase, event) pair, written out here
independently of how lifecycle.py builds its table, is either the expected move or refused."""

from __future__ import annotations

import itertools

import pytest

from services.transceiver.lifecycle import (
    TRANSITIONS,
    Action,
    Event,
    Lifecycle,
    LifecycleError,
    Phase,
)
from voiceedge.common.v1 import common_pb2
from voiceedge.transceiver.v1 import transceiver_pb2

CR = common_pb2
ST = transceiver_pb2
P, E, A = Phase, Event, Action
STAY = "stay"  # same phase, nothing to do
NO = "refused"  # cannot happen: LifecycleError


def end(reason: int) -> tuple[Phase, Action, int]:
    return (P.CLOSING, A.TEAR_DOWN, reason)


HANGUP = end(CR.CLOSE_REASON_CLIENT_HANGUP)
CONSENT = end(CR.CLOSE_REASON_CONSENT_LOST)
REQUESTED = end(CR.CLOSE_REASON_CLOSE_RPC)  # the default; callers pass their own
GONE = end(CR.CLOSE_REASON_CLIENT_GONE)

# Rows: phases; columns in Event's order:
#   CHECK, ICE_OK, ICE_FAIL, DTLS_OK, DTLS_FAIL, PEER_CLOSED, CONSENT, ICE_TIMEOUT,
#   BRIDGE_ENDED, BRIDGE_FAILED, CLOSE_REQUESTED, TEARDOWN_DONE,
#   CLIENT_SILENT, ICE_RESTARTED, PATH_SELECTED, GRACE_EXPIRED
EXPECTED: dict[Phase, tuple[object, ...]] = {
    P.NEW: (
        (P.CHECKING, A.NONE, 0),  # CHECKING: the same row, but for this first column (STAY)
        (P.ICE_CONNECTED, A.NONE, 0),
        end(CR.CLOSE_REASON_ICE_FAILED),
        (P.CONNECTED, A.START_MEDIA, 0),
        end(CR.CLOSE_REASON_DTLS_FAILED),
        HANGUP,
        HANGUP,
        end(CR.CLOSE_REASON_ICE_TIMEOUT),
        NO,
        NO,
        REQUESTED,
        NO,
        NO,
        STAY,
        STAY,
        NO,
    ),
    P.ICE_CONNECTED: (
        STAY,
        STAY,
        CONSENT,
        (P.CONNECTED, A.START_MEDIA, 0),
        end(CR.CLOSE_REASON_DTLS_FAILED),
        HANGUP,
        CONSENT,
        STAY,
        NO,
        NO,
        REQUESTED,
        NO,
        CONSENT,
        STAY,
        STAY,
        NO,
    ),
    P.CONNECTED: (
        STAY,
        STAY,
        CONSENT,
        STAY,
        end(CR.CLOSE_REASON_DTLS_FAILED),
        HANGUP,
        CONSENT,
        STAY,
        end(CR.CLOSE_REASON_BRIDGE_ENDED),
        end(CR.CLOSE_REASON_BRIDGE_ERROR),
        REQUESTED,
        NO,
        (P.RECONNECTING, A.AWAIT_RESTART, 0),
        STAY,
        STAY,
        STAY,
    ),
    P.RECONNECTING: (
        STAY,
        STAY,
        GONE,
        STAY,
        end(CR.CLOSE_REASON_DTLS_FAILED),
        HANGUP,
        GONE,
        STAY,
        end(CR.CLOSE_REASON_BRIDGE_ENDED),
        end(CR.CLOSE_REASON_BRIDGE_ERROR),
        REQUESTED,
        NO,
        STAY,
        (P.RECONNECTING, A.AWAIT_RESTART, 0),
        (P.CONNECTED, A.RESUME_MEDIA, 0),
        GONE,
    ),
    P.CLOSING: (
        STAY,
        STAY,
        STAY,
        STAY,
        STAY,
        STAY,
        STAY,
        STAY,
        STAY,
        STAY,
        STAY,
        (P.CLOSED, A.FINISHED, 0),
        STAY,
        STAY,
        STAY,
        STAY,
    ),
    P.CLOSED: (STAY, STAY, STAY, STAY, STAY, STAY, STAY, NO, NO, NO, STAY, NO, STAY, NO, STAY, NO),
}
EXPECTED[P.CHECKING] = (STAY, *EXPECTED[P.NEW][1:])

# Events that reach each phase, from NEW (the path the walk below takes to get there).
PATH_TO: dict[Phase, tuple[Event, ...]] = {
    P.NEW: (),
    P.CHECKING: (E.CHECK_RECEIVED,),
    P.ICE_CONNECTED: (E.CHECK_RECEIVED, E.ICE_COMPLETED),
    P.CONNECTED: (E.CHECK_RECEIVED, E.ICE_COMPLETED, E.DTLS_CONNECTED),
    P.RECONNECTING: (E.CHECK_RECEIVED, E.ICE_COMPLETED, E.DTLS_CONNECTED, E.CLIENT_SILENT),
    P.CLOSING: (E.CLOSE_REQUESTED,),
    P.CLOSED: (E.CLOSE_REQUESTED, E.TEARDOWN_DONE),
}


def in_phase(phase: Phase) -> Lifecycle:
    lifecycle = Lifecycle()
    for event in PATH_TO[phase]:
        lifecycle.feed(event)
    assert lifecycle.phase is phase
    return lifecycle


CASES = list(itertools.product(Phase, Event))


def test_the_expected_table_covers_every_pair_and_matches_the_module() -> None:
    assert set(EXPECTED) == set(Phase)
    assert all(len(row) == len(Event) for row in EXPECTED.values())
    allowed = {(p, e) for p, e in CASES if EXPECTED[p][list(Event).index(e)] != NO}
    assert set(TRANSITIONS) == allowed


@pytest.mark.parametrize(("phase", "event"), CASES, ids=[f"{p.value}-{e.value}" for p, e in CASES])
def test_every_phase_and_event(phase: Phase, event: Event) -> None:
    expected = EXPECTED[phase][list(Event).index(event)]
    lifecycle = in_phase(phase)
    reason_before, state_before = lifecycle.close_reason, lifecycle.public_state
    if expected == NO:
        with pytest.raises(LifecycleError):
            lifecycle.feed(event)
        assert lifecycle.phase is phase  # a refused event changes nothing
        assert lifecycle.close_reason == reason_before
        return
    step = lifecycle.feed(event, detail="why")
    assert step.before is phase
    if expected == STAY:
        assert (step.after, step.action) == (phase, A.NONE)
        assert lifecycle.phase is phase
        assert lifecycle.close_reason == reason_before
        assert lifecycle.close_detail == ""  # a later cause's detail is not kept either
        assert lifecycle.public_state == state_before
        return
    assert isinstance(expected, tuple)
    after, action, reason = expected
    assert (step.after, step.action, lifecycle.phase) == (after, action, after)
    if action is A.TEAR_DOWN:
        assert lifecycle.close_reason == reason
        assert lifecycle.close_detail == "why"
        assert lifecycle.ended
        # Closing reports the phase it was closed from until teardown is done.
        assert lifecycle.public_state == state_before
    else:
        assert lifecycle.close_reason == reason_before


def test_the_first_cause_wins() -> None:
    lifecycle = in_phase(P.CONNECTED)
    assert lifecycle.feed(E.BRIDGE_ENDED, "bye").action is A.TEAR_DOWN
    # What closing the session makes aiortc and the bridge report afterwards:
    for event in (E.PEER_CLOSED, E.BRIDGE_FAILED, E.ICE_FAILED, E.CONSENT_EXPIRED):
        assert lifecycle.feed(event, "later").action is A.NONE
    assert lifecycle.feed(E.CLOSE_REQUESTED, "rpc", CR.CLOSE_REASON_CLOSE_RPC).action is A.NONE
    assert (lifecycle.close_reason, lifecycle.close_detail) == (
        CR.CLOSE_REASON_BRIDGE_ENDED,
        "bye",
    )
    assert lifecycle.feed(E.TEARDOWN_DONE).action is A.FINISHED
    assert lifecycle.public_state == ST.SESSION_STATE_CLOSED
    assert lifecycle.close_reason == CR.CLOSE_REASON_BRIDGE_ENDED


def test_a_close_request_carries_its_reason_and_only_it_may() -> None:
    lifecycle = in_phase(P.CHECKING)
    lifecycle.feed(E.CLOSE_REQUESTED, "draining", CR.CLOSE_REASON_DRAINED)
    assert lifecycle.close_reason == CR.CLOSE_REASON_DRAINED
    with pytest.raises(LifecycleError):
        in_phase(P.CONNECTED).feed(E.BRIDGE_ENDED, "", CR.CLOSE_REASON_DRAINED)


def test_public_states() -> None:
    assert [in_phase(p).public_state for p in Phase] == [
        ST.SESSION_STATE_NEW,
        ST.SESSION_STATE_CONNECTING,
        ST.SESSION_STATE_CONNECTING,
        ST.SESSION_STATE_CONNECTED,
        ST.SESSION_STATE_CONNECTING,  # reconnecting: media held
        ST.SESSION_STATE_NEW,  # closing, closed from NEW (PATH_TO)
        ST.SESSION_STATE_CLOSED,
    ]
    assert not any(in_phase(p).ended for p in Phase if p not in (P.CLOSING, P.CLOSED))


def test_a_silent_client_is_waited_for_and_a_restart_resumes_it() -> None:
    lifecycle = in_phase(P.CONNECTED)
    assert lifecycle.feed(E.CLIENT_SILENT).action is A.AWAIT_RESTART
    assert lifecycle.reconnecting
    assert not lifecycle.ended
    assert lifecycle.feed(E.ICE_RESTARTED).action is A.AWAIT_RESTART  # a fresh grace
    assert lifecycle.feed(E.PATH_SELECTED).action is A.RESUME_MEDIA
    assert lifecycle.phase is P.CONNECTED
    assert lifecycle.feed(E.GRACE_EXPIRED).action is A.NONE  # a timer that fired late
    assert lifecycle.close_reason == CR.CLOSE_REASON_UNSPECIFIED


def test_a_client_that_never_returns_is_gone_once() -> None:
    lifecycle = in_phase(P.RECONNECTING)
    assert lifecycle.feed(E.GRACE_EXPIRED).action is A.TEAR_DOWN
    assert lifecycle.close_reason == CR.CLOSE_REASON_CLIENT_GONE
    assert "grace" in lifecycle.close_detail
    for event in (E.GRACE_EXPIRED, E.CONSENT_EXPIRED, E.PEER_CLOSED, E.CLOSE_REQUESTED):
        assert lifecycle.feed(event).action is A.NONE
    assert lifecycle.feed(E.TEARDOWN_DONE).action is A.FINISHED
    assert lifecycle.close_reason == CR.CLOSE_REASON_CLIENT_GONE
