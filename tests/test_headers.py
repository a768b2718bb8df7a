"""The pure header rules."""

from __future__ import annotations

from balancerpool.proxy.headers import request_fields


def test_request_fields_in_one_go() -> None:
    headers = [("Host", "shop.example"), ("Connection", "keep-alive, X-Hop, Upgrade"),
               ("X-Hop", "1"), ("TE", "trailers"), ("X-Forwarded-For", "203.0.113.9"),
               ("X-Forwarded-Host", "edge.example"), ("Upgrade", "WebSocket"), ("Accept", "*/*")]
    lines, websocket = request_fields(headers, frozenset({"host", "x-forwarded-for",
                                                          "x-forwarded-host"}),
                                      "127.0.0.1", "shop.example")
    assert lines == ["Accept: */*", "X-Forwarded-For: 203.0.113.9, 127.0.0.1",
                     "X-Forwarded-Host: edge.example, shop.example"]
    assert websocket


def test_a_websocket_needs_connection_upgrade_too() -> None:
    lines, websocket = request_fields([("Upgrade", "websocket")], frozenset(), "10.0.0.1", "")
    assert not websocket
    assert lines == ["X-Forwarded-For: 10.0.0.1"]  # no Host: no X-Forwarded-Host
