"""PATCH on a call's URL (RFC 9725 §4.3, RFC 8840): ICE restart and trickle over real HTTP
against the real app and fake transceivers; every answer code with its exact body."""

from __future__ import annotations

import aiohttp
import grpc
import pytest

from libs.wire import ufrag
from services.signaling.sdp import validate_offer
from services.signaling.signaling_testing import (
    AUTH,
    CHROME_OFFER,
    OTHER_KEY,
    SDP,
    Env,
    env,
    expect_error,
)

SDPFRAG = {"Content-Type": "application/trickle-ice-sdpfrag"}
CLIENT_UFRAG = validate_offer(CHROME_OFFER).ice_ufrag
NEW_UFRAG, NEW_PWD = "r3st", "0123456789abcdefghijkl"


def restart_frag(client_ufrag: str = NEW_UFRAG, client_pwd: str = NEW_PWD) -> str:
    # What Chromium's restartIce() offer says, cut to RFC 8840 §9's fragment.
    return (
        "a=ice-options:trickle ice2\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
        "a=mid:0\r\n"
        f"a=ice-ufrag:{client_ufrag}\r\n"
        f"a=ice-pwd:{client_pwd}\r\n"
        "a=candidate:1 1 udp 2113937151 192.0.2.7 50000 typ host\r\n"
        "a=end-of-candidates\r\n"
    )


def trickle_frag() -> str:
    return (
        f"a=ice-ufrag:{CLIENT_UFRAG}\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
        "a=mid:0\r\n"
        "a=candidate:1 1 udp 2113937151 192.0.2.7 50000 typ host\r\n"
    )


async def created(e: Env, base: str) -> tuple[str, str]:
    """POSTs CHROME_OFFER at `base`; (the session URL, its ETag)."""
    response = await e.http.post(e.url(base), data=CHROME_OFFER, headers={**AUTH, **SDP})
    assert response.status == 201, await response.text()
    return response.headers["Location"], response.headers["ETag"]


async def patch(e: Env, location: str, body: str, **headers: str) -> aiohttp.ClientResponse:
    return await e.http.patch(e.url(location), data=body, headers={**AUTH, **SDPFRAG, **headers})


@pytest.mark.parametrize("base", ["/whip", "/v1/realtime/calls"])
async def test_an_ice_restart_answers_200_with_new_credentials_and_a_new_etag(base: str) -> None:
    async with env() as e:
        location, etag = await created(e, base)
        call_id = location.rsplit("/", 1)[1]
        node = e.cluster.transceivers[0]
        first = node.sessions[call_id].ice_ufrag
        assert etag == f'"{first}"'

        response = await patch(e, location, restart_frag(), **{"If-Match": "*"})
        body = await response.text()
        assert response.status == 200, body
        assert response.headers["Content-Type"] == "application/trickle-ice-sdpfrag"
        (restart,) = node.restarts
        assert (restart.session_id, restart.remote_ice_ufrag) == (call_id, NEW_UFRAG)
        assert restart.remote_ice_pwd == NEW_PWD
        # A new routing token for the same cluster and transceiver, its derived password.
        assert restart.ice_ufrag != first
        token = ufrag.decode(restart.ice_ufrag, ufrag.dev_keyring())
        assert (token.cluster_id, token.transceiver_id) == (7, 40)
        assert restart.ice_pwd == ufrag.password(restart.ice_ufrag, ufrag.dev_keyring())
        assert body.split("\r\n") == [
            f"a=ice-ufrag:{restart.ice_ufrag}",
            f"a=ice-pwd:{restart.ice_pwd}",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "a=mid:0",
            "a=candidate:1 1 udp 2130706431 127.0.0.1 3478 typ host",
            "a=end-of-candidates",
            "",
        ]
        assert response.headers["ETag"] == f'"{restart.ice_ufrag}"' != etag

        # The old ETag is stale now (RFC 9725 §4.3.1), for a restart as for trickle.
        response = await patch(e, location, restart_frag("an0ther"), **{"If-Match": etag})
        error = await expect_error(response, 412, "invalid_request_error", "ice_session_changed")
        assert error["param"] is None
        response = await patch(e, location, trickle_frag(), **{"If-Match": etag})
        await expect_error(response, 412, "invalid_request_error", "ice_session_changed")
        # The current one is not; the same credentials again are trickle, not a restart.
        new_etag = f'"{restart.ice_ufrag}"'
        response = await patch(e, location, restart_frag(), **{"If-Match": new_etag})
        assert response.status == 204, await response.text()
        assert len(node.restarts) == 1
        # A second restart, naming the current tag among others, is another restart.
        response = await patch(
            e, location, restart_frag("thrd"), **{"If-Match": f'W/"x", {new_etag}'}
        )
        assert response.status == 200, await response.text()
        assert len(node.restarts) == 2


async def test_trickle_patches_are_204_and_reach_no_transceiver() -> None:
    async with env() as e:
        location, etag = await created(e, "/whip")
        for headers in ({}, {"If-Match": etag}, {"If-Match": "*"}):
            response = await patch(e, location, trickle_frag(), **headers)
            assert response.status == 204, await response.text()
            assert response.headers["ETag"] == etag
        response = await patch(e, location, "a=end-of-candidates\r\n")
        assert response.status == 204
        assert e.cluster.transceivers[0].restarts == []


async def test_a_restart_without_if_match_is_428() -> None:
    async with env() as e:
        location, _ = await created(e, "/whip")
        response = await patch(e, location, restart_frag())
        await expect_error(response, 428, "invalid_request_error", "if_match_required")
        assert e.cluster.transceivers[0].restarts == []


async def test_refusals_before_any_transceiver_is_asked() -> None:
    async with env() as e:
        location, _ = await created(e, "/whip")
        star = {"If-Match": "*"}
        response = await e.http.patch(
            e.url(location), data=restart_frag(), headers={**AUTH, **SDP, **star}
        )
        await expect_error(response, 415, "invalid_request_error", "unsupported_content_type")
        response = await patch(e, "/whip/rtc_unknown", restart_frag(), **star)
        await expect_error(response, 404, "invalid_request_error", "not_found")
        response = await patch(e, location, restart_frag(client_pwd="short"), **star)  # noqa: S106
        await expect_error(response, 400, "invalid_request_error", "sdp_bad_ice_credentials")
        response = await patch(e, location, "not an sdp line\r\n", **star)
        await expect_error(response, 400, "invalid_request_error", "sdpfrag_unparseable")
        response = await e.http.patch(
            e.url(location),
            data=restart_frag(),
            headers={"Authorization": f"Bearer {OTHER_KEY}", **SDPFRAG, **star},
        )
        await expect_error(response, 403, "invalid_request_error", "insufficient_permissions")
        response = await e.http.patch(e.url(location), data=restart_frag(), headers=SDPFRAG)
        await expect_error(response, 401, "invalid_request_error", "missing_api_key")
        assert e.cluster.transceivers[0].restarts == []

        assert (await e.http.delete(e.url(location), headers=AUTH)).status == 204
        response = await patch(e, location, restart_frag(), **star)
        await expect_error(response, 400, "invalid_request_error", "call_not_active")


async def test_a_transceiver_that_cannot_restart() -> None:
    async with env() as e:
        location, _ = await created(e, "/whip")
        node = e.cluster.transceivers[0]
        node.refuse = grpc.StatusCode.UNAVAILABLE
        response = await patch(e, location, restart_frag(), **{"If-Match": "*"})
        await expect_error(response, 503, "server_error", "transceivers_unavailable")
        assert response.headers["Retry-After"]
        # The session ended on the transceiver without signaling hearing of it.
        node.refuse = None
        node.sessions.clear()
        response = await patch(e, location, restart_frag(), **{"If-Match": "*"})
        await expect_error(response, 400, "invalid_request_error", "call_not_active")


async def test_preflight_names_patch_and_its_media_type() -> None:
    async with env() as e:
        location, _ = await created(e, "/whip")
        for url in (location, "/v1/realtime/calls/rtc_x"):
            response = await e.http.options(
                e.url(url),
                headers={
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "PATCH",
                    "Access-Control-Request-Headers": "authorization, content-type, if-match",
                },
            )
            assert response.status == 204
            assert "PATCH" in response.headers["Access-Control-Allow-Methods"]
            assert response.headers["Accept-Patch"] == "application/trickle-ice-sdpfrag"
            assert "if-match" in response.headers["Access-Control-Allow-Headers"]
