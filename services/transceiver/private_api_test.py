"""Fails loudly, naming the attribute, if an aiortc/aioice upgrade moves the private
attributes services/transceiver/aiortc_compat.py relies on."""

from __future__ import annotations

import aioice
import aiortc

from services.transceiver import aiortc_compat


async def test_pinned_private_attributes_still_exist() -> None:
    try:
        aiortc_compat.check_versions()
    except aiortc_compat.CompatError as exc:
        raise AssertionError(
            f"aiortc {aiortc.__version__} / aioice {aioice.__version__}: {exc}. "
            "The transceiver forces ICE credentials and shares one UDP socket through these "
            "internals; re-verify aiortc_compat.py against the new versions."
        ) from None


def test_fast_audio_level_matches_aiortc() -> None:
    import fractions

    import av
    import numpy as np

    original = aiortc.rtp.compute_audio_level_dbov
    if original is aiortc_compat.audio_level_dbov:
        raise AssertionError("run before install_fast_audio_level")
    rng = np.random.default_rng(7)
    for layout, amplitude in [("mono", 0), ("mono", 3), ("mono", 3000), ("stereo", 20000)]:
        channels = 2 if layout == "stereo" else 1
        data = (rng.standard_normal(960 * channels) * amplitude).clip(-32768, 32767)
        frame = av.AudioFrame(format="s16", layout=layout, samples=960)
        frame.planes[0].update(data.astype(np.int16).tobytes())
        frame.sample_rate = 48000
        frame.time_base = fractions.Fraction(1, 48000)
        assert aiortc_compat.audio_level_dbov(frame) == original(frame), (layout, amplitude)


async def test_forced_credentials_and_installed_protocol_reach_the_answer() -> None:
    pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio")
        (ice,) = aiortc_compat.ice_transports(pc)
        connection = aiortc_compat.connection_of(ice)
        aiortc_compat.set_local_credentials(connection, "UFRAGtoken", "p" * 32)
        assert ice.iceGatherer.getLocalParameters().usernameFragment == "UFRAGtoken"
        assert ice.iceGatherer.getLocalParameters().password == "p" * 32
        offer = await pc.createOffer()
        assert "a=ice-ufrag:UFRAGtoken" in offer.sdp
    finally:
        await pc.close()


def test_pylibsrtp_internals_the_native_rtp_core_uses() -> None:
    # rtpcore.srtp_pointers falls back to the Python RTP path (slower, same behaviour) when
    # these checks fail; fail here instead, so a pylibsrtp/libsrtp upgrade is looked at.
    import os

    import pylibsrtp

    from services.transceiver import rtpcore

    session = pylibsrtp.Session(
        pylibsrtp.Policy(key=os.urandom(30), ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    )
    pointers = rtpcore.srtp_pointers(session)
    assert pointers is not None, (
        f"pylibsrtp {pylibsrtp.__version__}: Session._srtp ({rtpcore.SRTP_CONTEXT_TYPE}) or "
        f"lib.srtp_protect/srtp_unprotect ({rtpcore.SRTP_FUNCTION_TYPE}) changed"
    )
    assert all(pointers)


async def test_the_task_index_finds_what_a_scan_of_every_task_finds() -> None:
    # index_pc_tasks (installed by SessionManager) must see every `__connect` aiortc
    # starts, or a session would skip waiting for one (a data-channel race at set-up, a
    # task outliving the session at close).
    import asyncio

    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    aiortc_compat.index_pc_tasks(loop)
    pcs = [aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[])) for _ in range(3)]
    try:
        names = ("RTCPeerConnection.__connect",)
        for pc in pcs:
            pc.addTransceiver("audio")
            await pc.setLocalDescription(await pc.createOffer())
            # setLocalDescription has just started `__connect`: compare before it runs.
            indexed = aiortc_compat._pc_tasks(pc, names)
            scanned = [
                task
                for task in asyncio.all_tasks()
                if not task.done()
                and task.get_coro().__qualname__ in names  # type: ignore[union-attr]
                and aiortc_compat._owner(task.get_coro()) is pc
            ]
            assert indexed
            assert set(indexed) == set(scanned)
    finally:
        for pc in pcs:
            await pc.close()
        for pc in pcs:
            await aiortc_compat.wait_pc_closed(pc)
        assert not any(aiortc_compat._pc_tasks(pc, aiortc_compat._PC_TASK_NAMES) for pc in pcs)
        loop.set_task_factory(previous)
        aiortc_compat._indexed_loops.discard(loop)
