"""A test backend run as its own process, so tests can kill it for real.

``python tests/backend.py --port P --name N [--route R]`` prints ``ready`` once it listens.
Every request is appended to the log file given with ``--log`` (one JSON line), so tests can see
exactly what reached the backend.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

from aiohttp import web


def build_app(name: str, route: str | None, log: Path | None) -> web.Application:
    peers: set[str] = set()

    def record(request: web.Request, extra: dict[str, object] | None = None) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            peers.add(f"{peer[0]}:{peer[1]}")
        if log is not None:
            entry = {"name": name, "method": request.method, "path": request.path_qs,
                     "peer": f"{peer[0]}:{peer[1]}" if peer else "", **(extra or {})}
            with log.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    async def hello(request: web.Request) -> web.Response:
        record(request)
        return web.Response(text=f"{name}\n", headers={"X-Backend": name})

    async def headers(request: web.Request) -> web.Response:
        record(request)
        return web.json_response({"name": name, "headers": [[k, v] for k, v in request.headers.items()],
                                  "path": request.path_qs},
                                 headers={"X-Backend": name, "Connection": "X-Resp-Hop",
                                          "X-Resp-Hop": "1", "Keep-Alive": "timeout=30",
                                          "X-End-To-End": "kept"})

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        record(request, {"size": size})
        return web.json_response({"name": name, "size": size, "sha256": digest.hexdigest(),
                                  "chunked": request.headers.get("Transfer-Encoding", "")})

    async def big(request: web.Request) -> web.StreamResponse:
        record(request)
        size = int(request.query.get("size", "0"))
        block = bytes(range(256)) * 256  # 64 KiB
        response = web.StreamResponse(headers={"X-Backend": name})
        if request.query.get("chunked") != "1":
            response.content_length = size
        await response.prepare(request)
        left = size if request.method != "HEAD" else 0
        while left > 0:
            piece = block[: min(left, len(block))]
            await response.write(piece)
            left -= len(piece)
        await response.write_eof()
        return response

    async def redirect(request: web.Request) -> web.Response:
        record(request)
        host = request.headers.get("Host", "")
        target = request.query.get("to", "/app/next")
        location = target if target.startswith("/") and request.query.get("relative") else \
            f"http://{host}{target}"
        return web.Response(status=302, headers={"Location": location, "X-Backend": name,
                                                 "Content-Location": f"http://{host}/app/here"})

    async def status(request: web.Request) -> web.Response:
        record(request)
        return web.Response(status=int(request.match_info["code"]), text=f"{name}\n",
                            headers={"X-Backend": name})

    async def order(request: web.Request) -> web.Response:
        """A non-idempotent action: each executed order is logged with its id."""
        order_id = (await request.read()).decode()
        await asyncio.sleep(0.01)
        record(request, {"order": order_id})
        return web.Response(text=f"{name} {order_id}\n")

    async def slow(request: web.Request) -> web.Response:
        record(request)
        await asyncio.sleep(float(request.query.get("s", "1")))
        return web.Response(text=f"{name}\n", headers={"X-Backend": name})

    health: dict[str, str] = {"status": "200", "body": "ready", "header": "yes"}

    async def health_check(request: web.Request) -> web.Response:
        record(request)
        return web.Response(status=int(health["status"]), text=health["body"],
                            headers={"X-Ready": health["header"]})

    async def set_health(request: web.Request) -> web.Response:
        for key in health:
            if key in request.query:
                health[key] = request.query[key]
        return web.json_response(health)

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"name": name, "route": route, "pid": os.getpid(),
                                  "peers": sorted(peers)})

    app = web.Application(client_max_size=1024**3)
    app.router.add_get("/headers", headers)
    app.router.add_get("/app/headers", headers)
    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/big", big)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/app/redirect", redirect)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/slow", slow)
    app.router.add_post("/order", order)
    app.router.add_get("/_info", info)
    app.router.add_route("*", "/health", health_check)
    app.router.add_get("/_set_health", set_health)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--route")
    parser.add_argument("--log", type=Path)
    args = parser.parse_args()
    runner = web.AppRunner(build_app(args.name, args.route, args.log), access_log=None,
                           keepalive_timeout=75)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print("ready", flush=True)
    # SIGTERM is a graceful stop, as real servers do: stop listening, finish what is in flight,
    # close idle keep-alive connections, exit.
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
