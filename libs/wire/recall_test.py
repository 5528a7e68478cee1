"""The recall wire format (protos/wire/relay-recall-v1.md): round trips, the test vector,
and truncated or padded input rejected, never read past."""

from __future__ import annotations

import pytest

from libs.wire import framing, recall

NONCE = bytes(range(16))
HEADER = framing.header("203.0.113.7", 50000)
UFRAG = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
PASSWORD = "p" * 32
# The test vector of protos/wire/relay-recall-v1.md.
VECTOR_PROOF = "96bf047db755d3b3485968f586fc67e1"


def test_hello_round_trip() -> None:
    data = recall.encode_hello(NONCE)
    assert data == b"VC\x01\x01" + NONCE
    assert recall.is_recall(data)
    assert recall.decode_hello(data) == NONCE
    with pytest.raises(recall.RecallError):
        recall.decode_hello(data[:-1])
    with pytest.raises(recall.RecallError):
        recall.encode_hello(b"short")


def test_the_proof_matches_the_documented_vector() -> None:
    assert recall.proof(PASSWORD, NONCE, HEADER, UFRAG).hex() == VECTOR_PROOF


def test_announce_round_trip_splits_into_datagrams_under_the_limit() -> None:
    entries = [
        recall.Entry(framing.header("203.0.113.7", port), UFRAG, bytes(recall.PROOF_LEN))
        for port in range(100)
    ]
    datagrams = recall.encode_announce(NONCE, entries)
    assert len(datagrams) > 1
    assert all(len(d) <= recall.MAX_DATAGRAM for d in datagrams)
    decoded = [e for d in datagrams for e in recall.decode_announce(d)[1]]
    assert decoded == entries
    assert recall.decode_announce(recall.encode_announce(NONCE, [])[0]) == (NONCE, [])


@pytest.mark.parametrize("cut", range(1, 40))
def test_a_truncated_or_padded_announce_is_rejected(cut: int) -> None:
    entry = recall.Entry(HEADER, UFRAG, recall.proof(PASSWORD, NONCE, HEADER, UFRAG))
    [data] = recall.encode_announce(NONCE, [entry])
    with pytest.raises(recall.RecallError):
        recall.decode_announce(data[:-cut])
    with pytest.raises(recall.RecallError):
        recall.decode_announce(data + b"x")
