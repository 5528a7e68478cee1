"""Fails loudly when what aiohttp_compat leans on moves in an aiohttp upgrade."""

from __future__ import annotations

import inspect

from aiohttp import web, web_protocol

from services.signaling import aiohttp_compat


def test_the_pinned_aiohttp_is_the_tested_one() -> None:
    assert aiohttp_compat.version_is_tested(), (
        "aiohttp changed: re-check aiohttp_compat.py (GuardedAppRunner._make_server mirrors "
        "AppRunner._make_server; handle_error's signature) and bump TESTED_AIOHTTP"
    )


def test_the_internals_we_use_are_there() -> None:
    app = web.Application()
    for name in ("_handle", "_make_request", "_handler_args", "_debug", "_set_loop"):
        assert hasattr(app, name), name
    assert inspect.iscoroutinefunction(web.AppRunner._make_server)
    assert list(inspect.signature(web_protocol.RequestHandler.handle_error).parameters) == [
        "self",
        "request",
        "status",
        "exc",
        "message",
    ]
    assert "keepalive_timeout" in inspect.signature(web_protocol.RequestHandler).parameters
    assert "lingering_time" in inspect.signature(web_protocol.RequestHandler).parameters
    # The header deadline relies on the keep-alive timer being armed when a connection opens.
    assert "_keepalive_handle" in inspect.getsource(web_protocol.RequestHandler.connection_made)
