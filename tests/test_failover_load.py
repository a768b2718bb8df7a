"""The headline promise under load, with real processes only: the proxy is the `balancerpool`
command, the backends are separate processes killed with SIGKILL or stopped with SIGTERM and
started again. Idempotent requests never fail; POSTs are never executed twice.

The figures (requests, longest latency around each fault) are written to
test-artifacts/failover.json, for the notes; nothing here asserts on time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import yaml

from .conftest import Backends, free_port, pool_doc

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
WORKERS = 16
DURATION = 5.0


async def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("proxy did not become ready")


def spawn_proxy(pool: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "balancerpool.proxy", "--log-level", "WARNING",
                             "proxy", str(pool), "--listen", f"127.0.0.1:{port}", "--admin", "off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def test_kill_and_sigterm_under_load_lose_nothing(tmp_path: Path, backends: Backends) -> None:
    a, b, c = (backends.start(n) for n in "abc")
    port = free_port()
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump(pool_doc(
        [{"url": x.url, "name": x.name} for x in (a, b, c)],
        memberDefaults={"retry": "1s", "connectiontimeout": "1s", "timeout": "10s"})))
    proxy = spawn_proxy(pool, port)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url + "/", proxy)
        results: list[tuple[float, float, str, int | str]] = []  # (start, latency, kind, status)
        orders_ok: list[str] = []
        start = time.monotonic()
        stop_at = start + DURATION

        async def worker(n: int, session: aiohttp.ClientSession) -> None:
            i = 0
            while time.monotonic() < stop_at:
                i += 1
                t0 = time.monotonic()
                kind = "POST" if i % 4 == 0 else "GET"
                try:
                    if kind == "GET":
                        async with session.get(url + "/slow?s=0.01") as resp:
                            await resp.read()
                            status: int | str = resp.status
                    else:
                        order = f"{n}-{i}"
                        async with session.post(url + "/order", data=order.encode()) as resp:
                            await resp.read()
                            status = resp.status
                            if status == 200:
                                orders_ok.append(order)
                except aiohttp.ClientError as exc:
                    status = type(exc).__name__
                results.append((t0 - start, time.monotonic() - t0, kind, status))

        async def faults() -> dict[str, float]:
            marks: dict[str, float] = {}
            await asyncio.sleep(1.0)
            marks["kill -9 a"] = time.monotonic() - start
            a.kill(signal.SIGKILL)
            await asyncio.sleep(1.0)
            marks["SIGTERM b"] = time.monotonic() - start
            b.kill(signal.SIGTERM)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(a.start)
            marks["a restarted"] = time.monotonic() - start
            await asyncio.to_thread(b.start)
            marks["b restarted"] = time.monotonic() - start
            return marks

        connector = aiohttp.TCPConnector(limit=WORKERS)
        async with aiohttp.ClientSession(connector=connector) as session:
            fault_task = asyncio.create_task(faults())
            await asyncio.gather(*(worker(n, session) for n in range(WORKERS)))
            marks = await fault_task
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(15)

    gets = [r for r in results if r[2] == "GET"]
    posts = [r for r in results if r[2] == "POST"]
    failed_gets = [r for r in gets if r[3] != 200]
    assert len(gets) > 500
    assert failed_gets == [], failed_gets[:5]
    # No POST was executed twice, and every POST that succeeded was executed exactly once.
    executed = Counter(r["order"] for x in (a, b, c) for r in x.requests() if r["method"] == "POST")
    assert [o for o, n in executed.items() if n > 1] == []
    assert all(executed[o] == 1 for o in orders_ok)
    # After the restarts, the restarted members serve again.
    served_late = {r["name"] for x in (a, b) for r in x.requests() if r["path"] == "/slow?s=0.01"}
    assert served_late >= {"a", "b"}

    def worst_after(mark: float, within: float = 0.5) -> float:
        window = [lat for t, lat, kind, _ in gets if mark <= t < mark + within]
        return max(window, default=0.0)

    normal = sorted(lat for t, lat, _, _ in gets if t < 0.9)
    figures = {
        "requests": len(results), "gets": len(gets), "posts": len(posts),
        "failed_gets": len(failed_gets),
        "failed_posts": sum(1 for r in posts if r[3] != 200),
        "posts_executed_twice": 0,
        "p50_before_faults_ms": round(normal[len(normal) // 2] * 1000, 2) if normal else None,
        "worst_latency_after_kill9_ms": round(worst_after(marks["kill -9 a"]) * 1000, 2),
        "worst_latency_after_sigterm_ms": round(worst_after(marks["SIGTERM b"]) * 1000, 2),
        "marks_s": {k: round(v, 3) for k, v in marks.items()},
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "failover.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
