"""The access log: one line per request, plain (httpd's combined format plus key=value fields) or
JSON. It goes through the ``balancerpool.access`` logger, which is silent unless configured, so
that a proxy without an access log pays one flag test per request and nothing more (the flag, not
``isEnabledFor``: that is a call into the logging module's Python code on every request)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from .messages import RequestHead

logger = logging.getLogger("balancerpool.access")
logger.propagate = False
logger.setLevel(logging.WARNING)

_FORMAT = {"plain": True}
_on = False


def configure(target: str | TextIO | None, fmt: str = "plain") -> None:
    """``target`` is a file path, ``-`` for stdout, a stream, or None to switch the log off."""
    global _on
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    if target is None:
        logger.setLevel(logging.WARNING)
        _on = False
        return
    handler: logging.Handler
    if target == "-":
        handler = logging.StreamHandler(sys.stdout)
    elif isinstance(target, str):
        handler = logging.FileHandler(target, encoding="utf-8")  # closed with the handler
    else:
        handler = logging.StreamHandler(target)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    _FORMAT["plain"] = fmt == "plain"
    _on = True


def enabled() -> bool:
    return _on


def record(head: RequestHead, status: int, sent: int, started: float, info: dict[str, Any],
           ok: bool) -> dict[str, Any]:
    """Build and emit one entry; returned for tests."""
    headers = {n.lower(): v for n, v in head.headers if n.lower() in ("referer", "user-agent")}
    entry: dict[str, Any] = {
        "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime()),
        "client": head.client,
        "method": head.method,
        "path": head.path + ("?" + head.query if head.query else ""),
        "protocol": f"HTTP/{head.version[0]}.{head.version[1]}",
        "status": status,
        "bytes": sent,
        "referer": headers.get("referer", "-"),
        "user_agent": headers.get("user-agent", "-"),
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
        "complete": ok,
        "pool": info.get("pool", "-"),
        "member": info.get("member", "-"),
        "attempts": info.get("attempts", 0),
        "route_reason": str(info.get("route_reason", info.get("reason", "-"))),
        "connect_ms": _ms(info.get("connect_ms")),
        "response_ms": _ms(info.get("response_ms")),
    }
    entry.update(info.get("balancer", {}))
    if _FORMAT["plain"]:
        fields = " ".join(f"{k}={v}" for k, v in entry.items() if k not in _COMBINED)
        line = (f'{entry["client"]} - - [{entry["time"]}] "{entry["method"]} {entry["path"]} '
                f'{entry["protocol"]}" {status} {sent} "{entry["referer"]}" "{entry["user_agent"]}" '
                f"{fields}")
    else:
        line = json.dumps(entry, separators=(",", ":"))
    logger.info("%s", line)
    return entry


def _ms(value: object) -> object:
    return round(value, 3) if isinstance(value, float) else "-" if value is None else value


_COMBINED = frozenset({"client", "time", "method", "path", "protocol", "status", "bytes", "referer",
                       "user_agent"})
