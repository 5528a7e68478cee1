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
