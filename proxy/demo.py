"""The embedded default: local demo backends behind the proxy, from ``examples/demo-pool.yaml``.

Each demo backend answers with its name and route and, like Tomcat with ``jvmRoute`` set, gives
new visitors a ``JSESSIONID=<id>.<route>`` cookie, so stickiness can be tried with no app at hand.
"""

from __future__ import annotations

import itertools
import secrets
from importlib import resources

from aiohttp import web

from . import metrics
from .admin import start_demo_admin
from .model import BalancerPool, MemberSpec, parse_pools
from .server import ProxyServer, aiohttp_site, run_until_signalled

DEMO_FILE = "demo-pool.yaml"


def demo_pool_text() -> str:
    return resources.files("balancerpool.examples").joinpath(DEMO_FILE).read_text(encoding="utf-8")


def backend_app(name: str, route: str | None) -> web.Application:
    counter = itertools.count(1)

    async def answer(request: web.Request) -> web.Response:
        session = request.cookies.get("JSESSIONID")
        text = (f"demo backend {name} (route {route or '-'})\n"
                f"request {next(counter)} {request.method} {request.path_qs}\n"
                f"session {session or '(new)'}\n")
        response = web.Response(text=text)
        response.headers["X-Demo-Backend"] = name
        if session is None:
            sid = secrets.token_hex(8) + (f".{route}" if route else "")
            response.set_cookie("JSESSIONID", sid, path="/", httponly=True)
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def start_backend(member: MemberSpec) -> web.AppRunner:
    runner = web.AppRunner(backend_app(member.name, member.route), access_log=None)
    await runner.setup()
    await aiohttp_site(runner, member.host, member.port).start()
    return runner


DEMO_ADMIN = ("127.0.0.1", 9090)


async def run_demo(listen: tuple[str, int] | None = None,
                   admin: tuple[str, int] = DEMO_ADMIN, frontend: str | None = None) -> None:
    pools = parse_pools(demo_pool_text())
    runners = [await start_backend(m) for pool in pools for m in pool.members]
    server = ProxyServer(None, listen, pools, frontend=frontend)
    try:
        await server.start()
        admin_runner, _, login = await start_demo_admin(server.forwarder, *admin)
        runners.append(admin_runner)
        server.forwarder.metrics = metrics.enable(server.forwarder)
        print(_instructions(pools, server.addresses), flush=True)
        print(login, flush=True)
        await run_until_signalled(server)
    finally:
        await server.close()
        for runner in runners:
            await runner.cleanup()
        print("demo stopped", flush=True)


def _instructions(pools: list[BalancerPool], addresses: list[tuple[str, int]]) -> str:
    host, port = addresses[0]
    url = f"http://{host}:{port}"
    lines = [f"balancerpool demo: proxy on {url}/", ""]
    for pool in pools:
        for m in pool.members:
            flags = "".join(sorted(m.status)) or "-"
            lines.append(f"  member {m.name:6} {m.url}  route={m.route} loadfactor={m.loadfactor:g} "
                         f"lbset={m.lbset} status={flags}")
    lines += [
        "",
        "Try:",
        f"  for i in 1 2 3 4 5 6; do curl -s {url}/ | head -1; done   # weighted: beta twice as often",
        f"  curl -si {url}/ | grep -i set-cookie                      # a Tomcat-style JSESSIONID",
        f"  curl -s -b 'JSESSIONID=abc.a' {url}/                        # sticky: always alpha",
        f"  curl -s '{url}/cart;jsessionid=abc.b'                       # the route in the path",
        f"  curl -c jar -b jar -s {url}/ {url}/ {url}/                # a browser-like session",
        "  balancerpool check examples/invalid-pool.yaml              # every error, with its field",
        "gamma is a hot standby: it serves only when alpha and beta are both unusable.",
        "",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)
