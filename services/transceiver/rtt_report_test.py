"""RTT reports for geosteer: grouping by client prefix, what is left out, one batch each."""

from __future__ import annotations

import pytest

from services.transceiver.rtt_report import RttCollector, client_prefix, rtt_samples
from voiceedge.common.v1 import common_pb2
from voiceedge.transceiver.v1 import transceiver_pb2

CONNECTED = transceiver_pb2.SESSION_STATE_CONNECTED


def _info(ip: str, rtt_ms: float, state: int = CONNECTED) -> transceiver_pb2.SessionInfo:
    stats = common_pb2.SessionStats(min_rtt_ms=rtt_ms, rtt_ms=rtt_ms * 3)
    stats.selected_remote_address.ip = ip
    return transceiver_pb2.SessionInfo(state=state, stats=stats)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ip", "prefix"),
    [
        ("203.0.113.7", "203.0.113.0/24"),
        ("2001:db8:1:2::9", "2001:db8:1::/48"),
        ("not an ip", None),
        ("", None),
    ],
)
def test_client_prefix(ip: str, prefix: str | None) -> None:
    assert client_prefix(ip) == prefix


def test_samples_average_per_prefix_and_skip_what_has_no_rtt() -> None:
    samples = rtt_samples(
        [
            _info("203.0.113.7", 20.0),
            _info("203.0.113.99", 40.0),
            _info("198.51.100.1", 80.0),
            _info("198.51.100.2", 0.0),  # not rtt_report_min_samples round trips yet
            _info("192.0.2.1", 10.0, state=transceiver_pb2.SESSION_STATE_CONNECTING),
            _info("", 15.0),  # no selected pair
        ]
    )
    assert [(s.client_prefix, s.rtt_ms, s.sample_count) for s in samples] == [
        ("198.51.100.0/24", 80.0, 1),
        ("203.0.113.0/24", 30.0, 2),
    ]


async def test_each_batch_goes_to_one_heartbeat() -> None:
    async def sessions() -> list[transceiver_pb2.SessionInfo]:
        return [_info("203.0.113.7", 25.0)]

    collector = RttCollector(sessions, interval_s=60.0)
    assert collector.take() == []
    await collector.sample_once()
    (sample,) = collector.take()
    assert sample.rtt_ms == 25.0
    assert collector.take() == []
    collector.start()
    await collector.close()
    await collector.close()  # idempotent
