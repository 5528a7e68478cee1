"""The HTTP API end to end over real sockets: real aiohttp server, real gRPC fakes of
geosteer and transceivers on 127.0.0.1:0. Every error path with its exact status and body."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from libs.wire import ufrag
from services.signaling.settings import SignalingSettings
from services.signaling.signaling_testing import (
    AUTH,
    CHROME_OFFER,
    OTHER_KEY,
    SDP,
    aiortc_offer,
    answer_ufrag,
    env,
    expect_error,
    no_sessions,
)

# -- the happy paths --------------------------------------------------------------------


async def test_post_call_returns_an_answer_with_a_minted_ufrag() -> None:
    async with env() as e:
        offer = await aiortc_offer()
        response = await e.post_offer(offer)
        answer = await response.text()
        assert response.status == 201, answer
        assert response.headers["Content-Type"] == "application/sdp"
        location = response.headers["Location"]
        assert location.startswith("/v1/realtime/calls/rtc_")
        call_id = location.rsplit("/", 1)[1]
        token = ufrag.decode(answer_ufrag(answer), ufrag.dev_keyring())
        assert (token.cluster_id, token.transceiver_id) == (7, 40)
        request = e.cluster.transceivers[0].sessions[call_id]
        assert request.offer_sdp == offer
        assert request.ice_pwd == ufrag.password(request.ice_ufrag, ufrag.dev_keyring())
        assert f"a=ice-pwd:{request.ice_pwd}" in answer
        assert "a=candidate:1 1 udp 2130706431 127.0.0.1 3478 typ host" in answer
        assert request.options.metadata["call_id"] == call_id
        assert e.cluster.geosteer.requests[0].client_ip == "127.0.0.1"
        spans = {span.name: span for span in e.spans.get_finished_spans()}
        root = spans["signaling.create_call"]
        assert root.context is not None
        for child in ("geosteer.route", "transceiver.create_session"):
            parent = spans[child].parent
            assert parent is not None
            assert parent.span_id == root.context.span_id
        assert root.attributes is not None
        assert root.attributes["call.id"] == call_id


async def test_ufrags_are_minted_with_the_current_key_after_rotation() -> None:
    old, new = "11" * 16, "22" * 16
    rotated = ufrag.Keyring.parse(f"1:{old},2:{new}")
    async with env(keyring=rotated) as e:
        response = await e.post_offer()
        minted = answer_ufrag(await response.text())
    # A relay holding both keys accepts it; one holding only the previous key does not.
    assert ufrag.decode(minted, ufrag.Keyring.parse(f"1:{old},2:{new}", 1)).key_id == 2
    with pytest.raises(ufrag.UfragError, match="UNKNOWN_KEY_ID"):
        ufrag.decode(minted, ufrag.Keyring.parse(f"1:{old}"))


async def test_multipart_offer_with_session_config() -> None:
    async with env() as e:
        form = aiohttp.FormData()
        form.add_field("sdp", CHROME_OFFER, content_type="application/sdp")
        form.add_field(
            "session",
            json.dumps({"type": "realtime", "model": "gpt-realtime", "instructions": "hi"}),
            content_type="application/json",
        )
        response = await e.http.post(e.url("/v1/realtime/calls"), data=form, headers=AUTH)
        assert response.status == 201, await response.text()
        call_id = response.headers["Location"].rsplit("/", 1)[1]
        config = e.cluster.transceivers[0].sessions[call_id].options.session_config
        assert config["model"] == "gpt-realtime"
        assert config["instructions"] == "hi"


async def test_delete_closes_the_session_and_is_idempotent() -> None:
    async with env() as e:
        response = await e.post_offer()
        location = response.headers["Location"]
        call_id = location.rsplit("/", 1)[1]
        response = await e.http.delete(e.url(location), headers=AUTH)
        assert response.status == 204
        assert e.cluster.transceivers[0].closed == [call_id]
        response = await e.http.delete(e.url(location), headers=AUTH)
        assert response.status == 204
        assert e.cluster.transceivers[0].closed == [call_id]
        response = await e.http.get(e.url(location), headers=AUTH)
        assert (await response.json())["status"] == "ended"


async def test_a_call_on_a_transceiver_declared_dead_is_ended() -> None:
    async with env() as e:
        response = await e.post_offer()
        location = response.headers["Location"]
        node = e.cluster.transceivers[0]
        assert node.server is not None
        await node.server.stop(None)  # unreachable from now on
        # Unreachable but still live in geosteer: it may come back, the state stands.
        response = await e.http.get(e.url(location), headers=AUTH)
        assert (await response.json())["status"] == "connecting"
        # Geosteer declares it dead (missed heartbeats): the call has ended.
        node.live = False
        response = await e.http.get(e.url(location), headers=AUTH)
        assert (await response.json())["status"] == "ended"
        # ... and stays ended without asking anyone again.
        e.cluster.geosteer.refuse = grpc.StatusCode.UNAVAILABLE
        response = await e.http.get(e.url(location), headers=AUTH)
        assert (await response.json())["status"] == "ended"


async def test_an_unreachable_transceiver_is_not_ended_while_geosteer_cannot_say() -> None:
    async with env() as e:
        response = await e.post_offer()
        location = response.headers["Location"]
        node = e.cluster.transceivers[0]
        assert node.server is not None
        await node.server.stop(None)
        node.live = False
        e.cluster.geosteer.refuse = grpc.StatusCode.UNAVAILABLE
        response = await e.http.get(e.url(location), headers=AUTH)
        assert (await response.json())["status"] == "connecting"


async def test_failover_to_the_next_transceiver() -> None:
    async with env() as e:
        e.cluster.transceivers[0].refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
        response = await e.post_offer()
        answer = await response.text()
        assert response.status == 201, answer
        token = ufrag.decode(answer_ufrag(answer), ufrag.dev_keyring())
        assert token.transceiver_id == 41
        assert len(e.cluster.transceivers[1].sessions) == 1
        attempts = [
            s for s in e.spans.get_finished_spans() if s.name == "transceiver.create_session"
        ]
        assert len(attempts) == 2


async def test_slow_transceiver_times_out_and_the_next_one_answers() -> None:
    async with env(SignalingSettings(create_session_timeout_s=0.3)) as e:
        e.cluster.transceivers[0].delay_s = 2.0
        response = await e.post_offer()
        assert response.status == 201, await response.text()
        assert len(e.cluster.transceivers[1].sessions) == 1


async def test_whip_create_patch_delete_and_cors() -> None:
    async with env() as e:
        origin = {"Origin": "https://app.example"}
        response = await e.http.options(
            e.url("/whip"),
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "authorization" in response.headers["Access-Control-Allow-Headers"]
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert response.headers["Accept-Post"] == "application/sdp"

        response = await e.http.post(
            e.url("/whip"), data=CHROME_OFFER, headers={**AUTH, **SDP, **origin}
        )
        assert response.status == 201, await response.text()
        assert response.headers["Content-Type"] == "application/sdp"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "Location" in response.headers["Access-Control-Expose-Headers"]
        location = response.headers["Location"]
        assert location.startswith("/whip/rtc_")

        # Trickle ICE is accepted (RFC 9725 §4.3.1) and needs nothing: patch_test.py.
        response = await e.http.patch(
            e.url(location),
            data="a=candidate:1 1 udp 1 192.0.2.1 9 typ host",
            headers={**AUTH, "Content-Type": "application/trickle-ice-sdpfrag"},
        )
        assert response.status == 204

        response = await e.http.delete(e.url(location), headers={**AUTH, **origin})
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert no_sessions(e.cluster)


async def test_cors_origin_list_echoes_only_allowed_origins() -> None:
    async with env(cors_origins=("https://good.example",)) as e:
        response = await e.http.post(
            e.url("/whip"),
            data=CHROME_OFFER,
            headers={**AUTH, **SDP, "Origin": "https://good.example"},
        )
        assert response.headers["Access-Control-Allow-Origin"] == "https://good.example"
        response = await e.http.post(
            e.url("/whip"),
            data=CHROME_OFFER,
            headers={**AUTH, **SDP, "Origin": "https://evil.example"},
        )
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_client_secret_is_single_purpose_and_carries_its_session() -> None:
    async with env() as e:
        response = await e.http.post(
            e.url("/v1/realtime/client_secrets"),
            json={
                "expires_after": {"anchor": "created_at", "seconds": 60},
                "session": {"type": "realtime", "voice": "marin"},
            },
            headers=AUTH,
        )
        body = await response.json()
        assert response.status == 200, body
        secret = body["value"]
        assert secret.startswith("ek_")
        assert body["expires_at"] == int(e.now[0]) + 60
        assert body["session"] == {"type": "realtime", "voice": "marin"}

        response = await e.post_offer(key=secret)
        assert response.status == 201, await response.text()
        location = response.headers["Location"]
        call_id = location.rsplit("/", 1)[1]
        config = e.cluster.transceivers[0].sessions[call_id].options.session_config
        assert config["voice"] == "marin"

        # The browser may hang up its own call with the same key.
        response = await e.http.delete(
            e.url(location), headers={"Authorization": f"Bearer {secret}"}
        )
        assert response.status == 204

        # 403: an ephemeral key cannot mint more keys.
        response = await e.http.post(
            e.url("/v1/realtime/client_secrets"),
            json={},
            headers={"Authorization": f"Bearer {secret}"},
        )
        await expect_error(response, 403, "invalid_request_error", "insufficient_permissions")

        # 401 once expired (OpenAI answers an expired key as an invalid one).
        e.now[0] += 61
        response = await e.post_offer(key=secret)
        error = await expect_error(response, 401, "invalid_request_error", "invalid_api_key")
        assert error["message"] == "Unknown or expired client secret provided."


# -- every error path -------------------------------------------------------------------


async def test_401_missing_and_invalid_keys() -> None:
    async with env() as e:
        response = await e.http.post(e.url("/v1/realtime/calls"), data=CHROME_OFFER, headers=SDP)
        await expect_error(response, 401, "invalid_request_error", "missing_api_key")
        response = await e.http.post(
            e.url("/v1/realtime/calls"),
            data=CHROME_OFFER,
            headers={**SDP, "Authorization": "Basic x"},
        )
        await expect_error(response, 401, "invalid_request_error", "missing_api_key")
        response = await e.post_offer(key="sk-wrong-0123456789")
        error = await expect_error(response, 401, "invalid_request_error", "invalid_api_key")
        assert error == {
            "type": "invalid_request_error",
            "code": "invalid_api_key",
            "message": "Incorrect API key provided.",
            "param": None,
        }
        response = await e.post_offer(key="ek_forged")
        await expect_error(response, 401, "invalid_request_error", "invalid_api_key")
        response = await e.http.delete(e.url("/v1/realtime/calls/rtc_x"))
        await expect_error(response, 401, "invalid_request_error", "missing_api_key")
        assert not e.cluster.geosteer.requests


async def test_403_another_keys_call() -> None:
    async with env() as e:
        response = await e.post_offer()
        location = response.headers["Location"]
        response = await e.http.delete(
            e.url(location), headers={"Authorization": f"Bearer {OTHER_KEY}"}
        )
        await expect_error(response, 403, "invalid_request_error", "insufficient_permissions")
        assert len(e.cluster.transceivers[0].sessions) == 1


async def test_404_unknown_call_and_route() -> None:
    async with env() as e:
        response = await e.http.delete(e.url("/v1/realtime/calls/rtc_nope"), headers=AUTH)
        error = await expect_error(response, 404, "invalid_request_error", "not_found")
        assert error["message"] == "Call 'rtc_nope' not found."
        response = await e.http.delete(e.url("/whip/rtc_nope"), headers=AUTH)
        await expect_error(response, 404, "invalid_request_error", "not_found")
        response = await e.http.get(e.url("/v1/nothing"), headers=AUTH)
        await expect_error(response, 404, "invalid_request_error", "not_found")
        response = await e.http.get(e.url("/whip"), headers=AUTH)
        await expect_error(response, 405, "invalid_request_error", "method_not_allowed")
        assert "POST" in response.headers["Allow"]


def without(offer: str, prefix: str) -> str:
    return "\r\n".join(line for line in offer.split("\r\n") if not line.startswith(prefix))


async def test_400_malformed_offers() -> None:
    async with env() as e:
        cases = [
            ("garbage", "sdp_unparseable"),
            (CHROME_OFFER.replace("m=audio", "m=video"), "sdp_no_audio"),
            (
                without(CHROME_OFFER, "a=ice-pwd"),
                "sdp_no_ice_credentials",
            ),
            (
                without(CHROME_OFFER, "a=fingerprint"),
                "sdp_no_fingerprint",
            ),
        ]
        for offer, code in cases:
            response = await e.post_offer(offer)
            await expect_error(response, 400, "invalid_request_error", code)
        form = aiohttp.FormData()
        form.add_field("session", "{}", content_type="application/json")
        response = await e.http.post(e.url("/v1/realtime/calls"), data=form, headers=AUTH)
        await expect_error(response, 400, "invalid_request_error", "missing_sdp")
        form = aiohttp.FormData()
        form.add_field("sdp", CHROME_OFFER, content_type="application/sdp")
        form.add_field("session", "[not json", content_type="application/json")
        response = await e.http.post(e.url("/v1/realtime/calls"), data=form, headers=AUTH)
        await expect_error(response, 400, "invalid_request_error", "invalid_session")
        # Nothing reached routing.
        assert not e.cluster.geosteer.requests


async def test_400_when_the_transceiver_rejects_the_offer() -> None:
    async with env() as e:
        e.cluster.transceivers[0].refuse = grpc.StatusCode.INVALID_ARGUMENT
        response = await e.post_offer()
        error = await expect_error(response, 400, "invalid_request_error", "invalid_offer")
        assert error["message"] == "transceiver-0 refuses"
        assert no_sessions(e.cluster)


async def test_413_oversized_bodies() -> None:
    async with env() as e:
        big = CHROME_OFFER + "a=x:" + "y" * 70_000 + "\r\n"
        response = await e.post_offer(big)
        error = await expect_error(response, 413, "invalid_request_error", "request_too_large")
        assert error["message"] == "Request body is larger than 65536 bytes."

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b"a=x:" + b"y" * 8000 + b"\r\n"

        response = await e.http.post(e.url("/whip"), data=chunked(), headers={**AUTH, **SDP})
        await expect_error(response, 413, "invalid_request_error", "request_too_large")
        assert not e.cluster.geosteer.requests


async def test_415_wrong_content_type() -> None:
    async with env() as e:
        response = await e.http.post(
            e.url("/v1/realtime/calls"),
            data=CHROME_OFFER,
            headers={**AUTH, "Content-Type": "text/plain"},
        )
        await expect_error(response, 415, "invalid_request_error", "unsupported_content_type")
        form = aiohttp.FormData()
        form.add_field("sdp", CHROME_OFFER, content_type="application/sdp")
        response = await e.http.post(e.url("/whip"), data=form, headers=AUTH)
        await expect_error(response, 415, "invalid_request_error", "unsupported_content_type")
        response = await e.http.post(
            e.url("/v1/realtime/client_secrets"),
            data="seconds=5",
            headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
        )
        await expect_error(response, 415, "invalid_request_error", "unsupported_content_type")


async def test_400_client_secret_expiry_out_of_range() -> None:
    async with env() as e:
        for seconds in (5, 7201, "ten"):
            response = await e.http.post(
                e.url("/v1/realtime/client_secrets"),
                json={"expires_after": {"seconds": seconds}},
                headers=AUTH,
            )
            await expect_error(response, 400, "invalid_request_error", "invalid_expires_after")


async def test_429_per_key() -> None:
    settings = SignalingSettings(rate_per_key_per_s=0.01, burst_per_key=2)
    async with env(settings) as e:
        for _ in range(2):
            assert (await e.post_offer()).status == 201
        response = await e.post_offer()
        await expect_error(response, 429, "requests", "rate_limit_exceeded")
        assert int(response.headers["Retry-After"]) >= 1
        # Another key still passes.
        assert (await e.post_offer(key=OTHER_KEY)).status == 201


async def test_429_per_ip_before_authentication() -> None:
    settings = SignalingSettings(rate_per_ip_per_s=0.01, burst_per_ip=2)
    async with env(settings) as e:
        for _ in range(2):
            await e.post_offer(key="sk-wrong-0123456789")
        response = await e.post_offer()
        await expect_error(response, 429, "requests", "rate_limit_exceeded")
        assert int(response.headers["Retry-After"]) >= 1


async def test_per_ip_limit_uses_forwarded_for_from_trusted_proxies() -> None:
    settings = SignalingSettings(rate_per_ip_per_s=0.01, burst_per_ip=1)
    async with env(settings, trusted_proxies=("127.0.0.0/8",)) as e:
        for client in ("198.51.100.1", "198.51.100.2"):
            response = await e.http.post(
                e.url("/v1/realtime/calls"),
                data=CHROME_OFFER,
                headers={**AUTH, **SDP, "X-Forwarded-For": f"6.6.6.6, {client}"},
            )
            assert response.status == 201
        assert [r.client_ip for r in e.cluster.geosteer.requests] == [
            "198.51.100.1",
            "198.51.100.2",
        ]
        response = await e.http.post(
            e.url("/v1/realtime/calls"),
            data=CHROME_OFFER,
            headers={**AUTH, **SDP, "X-Forwarded-For": "198.51.100.1"},
        )
        await expect_error(response, 429, "requests", "rate_limit_exceeded")


async def test_503_no_cluster_capacity() -> None:
    async with env() as e:
        e.cluster.geosteer.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
        response = await e.post_offer()
        await expect_error(response, 503, "server_error", "no_capacity")
        assert response.headers["Retry-After"] == "2"


async def test_503_every_transceiver_full_leaves_nothing_behind() -> None:
    async with env() as e:
        for node in e.cluster.transceivers:
            node.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
        response = await e.post_offer()
        await expect_error(response, 503, "server_error", "no_capacity")
        assert response.headers["Retry-After"] == "2"
        assert no_sessions(e.cluster)


async def test_a_cluster_whose_transceivers_all_refuse_hands_the_call_to_the_next() -> None:
    # Geosteer's view lags a heartbeat: the cluster it chose is full by now, the next has room.
    async with env(spill_clusters=1) as e:
        for node in e.cluster.transceivers:
            node.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
        response = await e.post_offer()
        answer = await response.text()
        assert response.status == 201, answer
        assert ufrag.decode(answer_ufrag(answer), ufrag.dev_keyring()).cluster_id == 8
        (spilled,) = e.cluster.geosteer.spill[8]
        assert len(spilled.sessions) == 1
        assert no_sessions(e.cluster)
        excluded = [list(r.hints.excluded_cluster_ids) for r in e.cluster.geosteer.requests]
        assert excluded == [[], [7]]
        # The call is recorded on the transceiver that took it: hanging up closes it there.
        location = response.headers["Location"]
        hangup = await e.http.delete(e.url(location), headers=AUTH)
        assert hangup.status == 204, await hangup.text()
        assert spilled.closed == [location.rsplit("/", 1)[1]]


async def test_503_after_max_cluster_attempts_with_the_first_clusters_refusal() -> None:
    async with env(SignalingSettings(max_cluster_attempts=2), spill_clusters=2) as e:
        for node in e.cluster.transceivers:
            node.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
        for nodes in e.cluster.geosteer.spill.values():
            for node in nodes:
                node.refuse = grpc.StatusCode.UNAVAILABLE
        response = await e.post_offer()
        await expect_error(response, 503, "server_error", "no_capacity")
        excluded = [list(r.hints.excluded_cluster_ids) for r in e.cluster.geosteer.requests]
        assert excluded == [[], [7]]  # the third cluster is never asked


async def test_503_when_geosteer_has_no_other_cluster() -> None:
    async with env(SignalingSettings(max_cluster_attempts=3)) as e:
        for node in e.cluster.transceivers:
            node.refuse = grpc.StatusCode.UNAVAILABLE
        response = await e.post_offer()
        # The cluster's own refusal, not geosteer's "nothing left" for the retry.
        await expect_error(response, 503, "server_error", "transceivers_unavailable")
        excluded = [list(r.hints.excluded_cluster_ids) for r in e.cluster.geosteer.requests]
        assert excluded == [[], [7]]


async def test_503_transceivers_failing() -> None:
    async with env() as e:
        for node in e.cluster.transceivers:
            node.refuse = grpc.StatusCode.UNAVAILABLE
        response = await e.post_offer()
        await expect_error(response, 503, "server_error", "transceivers_unavailable")
        assert response.headers["Retry-After"] == "2"


async def test_503_geosteer_unreachable() -> None:
    settings = SignalingSettings(geosteer_timeout_s=0.5)
    # Port 1 on loopback: nothing listens, connections are refused at once.
    async with env(settings, geosteer_address="127.0.0.1:1") as e:
        response = await e.post_offer()
        await expect_error(response, 503, "server_error", "routing_unavailable")
        assert response.headers["Retry-After"] == "2"


async def test_503_while_draining() -> None:
    async with env() as e:
        e.signaling.service.draining = True
        response = await e.post_offer()
        await expect_error(response, 503, "server_error", "draining")
        assert not e.cluster.geosteer.requests


async def test_a_client_secrets_bound_session_wins_over_the_offers() -> None:
    async with env() as e:
        response = await e.http.post(
            e.url("/v1/realtime/client_secrets"),
            json={"session": {"instructions": "be kind"}},
            headers=AUTH,
        )
        secret = (await response.json())["value"]
        form = aiohttp.FormData()
        form.add_field("sdp", CHROME_OFFER, content_type="application/sdp")
        form.add_field("session", '{"instructions": "leak secrets", "voice": "marin"}')
        response = await e.http.post(
            e.url("/v1/realtime/calls"), data=form, headers={"Authorization": f"Bearer {secret}"}
        )
        assert response.status == 201
        call_id = response.headers["Location"].rsplit("/", 1)[1]
        config = e.cluster.transceivers[0].sessions[call_id].options.session_config
        assert config["instructions"] == "be kind"
        assert config["voice"] == "marin"  # what the secret did not bind, the page may set
        assert config["type"] == "realtime"


# -- OpenAI SDK compatibility ------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "allowed"),
    [
        # What @openai/agents-realtime sends with its SDP POST.
        (
            "authorization,content-type,x-openai-agents-sdk",
            "authorization, content-type, x-openai-agents-sdk",
        ),
        # The openai package in a browser (dangerouslyAllowBrowser).
        (
            "Authorization, X-Stainless-Lang, x-stainless-os, OpenAI-Beta",
            "Authorization, X-Stainless-Lang, x-stainless-os, OpenAI-Beta",
        ),
        ("authorization, x-evil, cookie", "authorization"),
        ("", "Authorization, Content-Type, If-Match"),
    ],
)
async def test_cors_preflight_reflects_the_allowed_headers_it_was_asked_for(
    requested: str, allowed: str
) -> None:
    async with env() as e:
        headers = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"}
        if requested:
            headers["Access-Control-Request-Headers"] = requested
        response = await e.http.options(e.url("/v1/realtime/calls"), headers=headers)
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Headers"] == allowed
        assert response.headers["Vary"] == "Access-Control-Request-Headers"
        response = await e.http.options(e.url("/v1/realtime/calls/rtc_x/hangup"), headers=headers)
        assert response.status == 204


async def test_hangup_ends_the_call_and_a_second_one_is_an_error() -> None:
    async with env() as e:
        response = await e.post_offer()
        assert response.status == 201
        call_id = response.headers["Location"].rsplit("/", 1)[1]
        response = await e.http.post(e.url(f"/v1/realtime/calls/{call_id}/hangup"), headers=AUTH)
        assert response.status == 200
        assert await response.json() == {}
        assert e.cluster.transceivers[0].closed == [call_id]
        again = await e.http.post(e.url(f"/v1/realtime/calls/{call_id}/hangup"), headers=AUTH)
        await expect_error(again, 400, "invalid_request_error", "call_not_active")
        other = await e.http.post(
            e.url(f"/v1/realtime/calls/{call_id}/hangup"),
            headers={"Authorization": f"Bearer {OTHER_KEY}"},
        )
        await expect_error(other, 403, "invalid_request_error", "insufficient_permissions")
        unknown = await e.http.post(e.url("/v1/realtime/calls/rtc_nope/hangup"), headers=AUTH)
        await expect_error(unknown, 404, "invalid_request_error", "not_found")


async def test_client_secret_session_type_defaults_to_realtime() -> None:
    async with env() as e:
        response = await e.http.post(e.url("/v1/realtime/client_secrets"), headers=AUTH)
        assert (await response.json())["session"] == {"type": "realtime"}
        response = await e.http.post(
            e.url("/v1/realtime/client_secrets"),
            json={"session": {"type": "transcription"}},
            headers=AUTH,
        )
        await expect_error(response, 400, "invalid_request_error", "invalid_session")


async def test_sideband_websocket_relays_both_ways_and_ends_with_the_call() -> None:
    async with env() as e:
        response = await e.post_offer()
        call_id = response.headers["Location"].rsplit("/", 1)[1]
        url = e.url(f"/v1/realtime?call_id={call_id}")
        async with e.http.ws_connect(url, headers=AUTH) as ws:
            created = await ws.receive_json(timeout=5)
            assert created["type"] == "session.created"
            await ws.send_json({"type": "response.create"})
            echoed = await ws.receive_json(timeout=5)
            assert echoed == {
                "type": "fake.echo",
                "event_id": "event_f1",
                "event": {"type": "response.create"},
            }
            response = await e.http.delete(e.url(f"/v1/realtime/calls/{call_id}"), headers=AUTH)
            assert response.status == 204
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


@pytest.mark.parametrize(
    ("query", "auth", "status", "code"),
    [
        ("", AUTH, 400, "missing_call_id"),
        ("?call_id=rtc_nope", AUTH, 404, "not_found"),
        ("?call_id={call}", {}, 401, "missing_api_key"),
        ("?call_id={call}", {"Authorization": f"Bearer {OTHER_KEY}"}, 403, None),
    ],
)
async def test_sideband_refusals_are_openai_errors_before_the_upgrade(
    query: str, auth: dict[str, str], status: int, code: str | None
) -> None:
    async with env() as e:
        response = await e.post_offer()
        call_id = response.headers["Location"].rsplit("/", 1)[1]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await e.http.ws_connect(
                e.url("/v1/realtime" + query.format(call=call_id)), headers=auth
            )
        assert refused.value.status == status
        if code is not None:
            failed = await e.http.get(
                e.url("/v1/realtime" + query.format(call=call_id)),
                headers={**auth, "Connection": "Upgrade", "Upgrade": "websocket"},
            )
            assert (await failed.json())["error"]["code"] == code


async def test_sideband_refuses_a_client_secret() -> None:
    async with env() as e:
        response = await e.http.post(e.url("/v1/realtime/client_secrets"), headers=AUTH)
        secret = (await response.json())["value"]
        response = await e.post_offer()
        call_id = response.headers["Location"].rsplit("/", 1)[1]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await e.http.ws_connect(
                e.url(f"/v1/realtime?call_id={call_id}"),
                headers={"Authorization": f"Bearer {secret}"},
            )
        assert refused.value.status == 403
