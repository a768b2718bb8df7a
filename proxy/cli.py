"""``balancerpool``: run the proxy from a file, run the demo, or check a file."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .hardening import DEFAULT_LIMITS, Limits
from .keys import load_session_keys
from .model import BalancerPool, InvalidBalancerPool, parse_duration, parse_listen, parse_pools

#: Kept here (not imported from .server) so that ``check`` stays free of the server's imports.
FRONTENDS = ("fast", "aiohttp")
FRONTEND_HELP = ("HTTP front end: fast (httptools protocol, the default) or aiohttp "
                 "(aiohttp's low-level server)")


def _admin(text: str) -> tuple[str, int] | None:
    return None if text == "off" else _listen(text)


def _listen(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: The listener's client limits (hardening.Limits), one option each: --max-request-line ...
LIMIT_HELP = {
    "max_request_line": "bytes in a request line; 414 beyond",
    "max_header_size": "bytes in one header field; 431 beyond",
    "max_headers": "header fields in a request; 400 beyond",
    "max_header_section": "bytes in a request's header section; 431 beyond",
    "header_timeout": "time from a request's first byte (a connection's accept) to the end of its "
                      "head; 408 after",
    "body_timeout": "time a request body may take, plus 1s per --body-min-rate bytes; 408 after",
    "body_min_rate": "bytes per second that earn a slow body one more second",
    "keepalive_timeout": "an idle keep-alive connection is closed after this",
    "send_timeout": "a client that reads nothing of a response for this long is cut",
}


def _workers(text: str) -> int:
    from .workers import worker_count

    return worker_count(text)


def _duration(text: str) -> float:
    try:
        return parse_duration(float(text) if text.replace(".", "", 1).isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_limits(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("client limits (the fast front end; see docs/security.md)")
    for name, text in LIMIT_HELP.items():
        default = getattr(DEFAULT_LIMITS, name)
        timed = isinstance(default, float)
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=_duration if timed else int,
                           metavar="DURATION" if timed else "N",
                           help=f"{text} (default {default:g}{'s' if timed else ''})")


def limits_from(args: argparse.Namespace) -> Limits:
    """The Limits the options ask for; raises ValueError naming each bad option."""
    given = {name: getattr(args, name) for name in LIMIT_HELP if getattr(args, name, None) is not None}
    limits = Limits(**given)
    errors = limits.errors()
    if errors:
        raise ValueError("; ".join("--" + e.replace("_", "-") for e in errors))
    return limits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balancerpool", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    proxy = commands.add_parser("proxy", help="run the proxy from a BalancerPool file")
    proxy.add_argument("file", type=Path)
    proxy.add_argument("--listen", type=_listen, metavar="HOST:PORT",
                       help="listen here instead of the file's spec.listen")
    proxy.add_argument("--frontend", choices=FRONTENDS, default="fast", help=FRONTEND_HELP)
    proxy.add_argument("--admin", type=_admin, default=("127.0.0.1", 9090), metavar="HOST:PORT|off",
                       help="the admin listener: /healthz, /readyz, /metrics and the balancer-manager "
                            "(default 127.0.0.1:9090; 'off' for none)")
    proxy.add_argument("--admin-token-file", type=Path, metavar="FILE",
                       help="bearer tokens for the manager, one per line")
    proxy.add_argument("--admin-password-file", type=Path, metavar="FILE",
                       help="user:hash lines for the manager (python -m balancerpool.proxy.admin "
                            "hash-password)")
    proxy.add_argument("--persist", action="store_true",
                       help="write manager changes back to FILE atomically (httpd's BalancerPersist)")
    proxy.add_argument("--access-log", metavar="PATH|-", help="write an access log here ('-': stdout)")
    proxy.add_argument("--access-log-format", choices=["plain", "json"], default="plain")
    proxy.add_argument("--workers", type=_workers, default=1, metavar="N|auto",
                       help="worker processes sharing the listeners (SO_REUSEPORT), under a "
                            "supervisor that restarts them and shares member state; 'auto': one "
                            "per CPU (default 1: a single process)")
    # A worker's own options, given by the supervisor (proxy/workers.py).
    proxy.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    proxy.add_argument("--bus-fd", type=int, help=argparse.SUPPRESS)
    _add_limits(proxy)

    demo = commands.add_parser("demo", help="start demo backends and the proxy on 127.0.0.1:8080")
    demo.add_argument("--listen", type=_listen, metavar="HOST:PORT")
    demo.add_argument("--frontend", choices=FRONTENDS, default="fast", help=FRONTEND_HELP)

    check = commands.add_parser("check", help="validate BalancerPool files and print every problem")
    check.add_argument("files", type=Path, nargs="+")
    return parser


def read_pools(path: Path) -> list[BalancerPool] | None:
    """The pools of a file with their session keys; None after printing every problem."""
    try:
        pools = parse_pools(path.read_text(encoding="utf-8"))
        load_session_keys(pools)
    except InvalidBalancerPool as exc:
        print(f"{path}: invalid, {len(exc.errors)} problem(s):", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return None
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{path}: cannot be read: {exc}", file=sys.stderr)
        return None
    return pools


def check(files: list[Path]) -> int:
    status = 0
    for path in files:
        pools = read_pools(path)
        if pools is None:
            status = 1
        else:
            names = ", ".join(f"{p.name} ({len(p.members)} members)" for p in pools)
            print(f"{path}: ok: {names}")
    return status


async def _serve(args: argparse.Namespace) -> int:
    from . import accesslog, metrics
    from .admin import MANAGER, AdminAuth, start_admin
    from .persist import FileStore
    from .server import ProxyServer, run_until_signalled

    file: Path = args.file
    # --workers: this process is worker `worker` of a supervisor (proxy/workers.py); worker 0
    # alone runs the health checks and the admin listener.
    worker: int | None = getattr(args, "worker_index", None)
    server = ProxyServer(file, args.listen, frontend=args.frontend, limits=args.limits,
                         reuse_port=worker is not None, health_checks=not worker)
    bus = None
    if worker is not None:
        from .workers import WorkerBus, tag_access_log

        bus = WorkerBus(server, worker, args.bus_fd)
        await bus.connect()
    try:
        await server.start()
    except InvalidBalancerPool as exc:
        print(f"{file}: invalid, {len(exc.errors)} problem(s):", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        await server.close()
        if bus is not None:
            await bus.close()
        return 1
    accesslog.configure(args.access_log, args.access_log_format)
    if bus is not None:
        tag_access_log(bus.index, args.access_log_format == "plain")
    admin = None
    try:
        if args.admin is not None and not worker:
            try:
                if args.admin_token_file is None and args.admin_password_file is None:
                    auth = AdminAuth(locked=True)
                    logging.getLogger("balancerpool.proxy").warning(
                        "no --admin-token-file or --admin-password-file: the balancer-manager is "
                        "locked (probes and /metrics still serve)")
                else:
                    auth = AdminAuth.from_files(token_file=args.admin_token_file,
                                                htpasswd_file=args.admin_password_file)
            except (ValueError, OSError) as exc:
                print(f"balancerpool: admin credentials: {exc}", file=sys.stderr)
                return 1
            admin, url = await start_admin(server.forwarder, args.admin[0], args.admin[1], auth=auth,
                                           store=FileStore(file) if args.persist else None,
                                           ready=lambda: server.generation > 0)
            server.forwarder.metrics = metrics.enable(server.forwarder)
            logging.getLogger("balancerpool.proxy").info("admin listener on %s", url)
            if bus is not None:
                admin.app[MANAGER].on_applied = bus.config_applied
                admin.app[MANAGER].gather_metrics = bus.gather_metrics
        elif args.admin is not None:
            # The other workers count requests too: worker 0's /metrics gathers them.
            server.forwarder.metrics = metrics.enable(server.forwarder)
        if bus is not None:
            bus.start()
        await run_until_signalled(server, bus.stopped if bus is not None else None)
    finally:
        if admin is not None:
            await admin.cleanup()
        if bus is not None:
            await bus.close()
        await server.close()
        accesslog.configure(None)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "proxy":
        try:
            args.limits = limits_from(args)
        except ValueError as exc:
            parser.error(str(exc))
        if (args.worker_index is None) != (args.bus_fd is None):
            parser.error("--worker-index and --bus-fd go together (the supervisor's own options)")
    worker = getattr(args, "worker_index", None)
    where = f" [worker {worker}]" if worker is not None else ""
    logging.basicConfig(level=args.log_level,
                        format=f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s")
    if args.command == "check":
        return check(args.files)
    if args.command == "proxy" and args.workers > 1 and worker is None:
        from .workers import supervise

        pools = read_pools(args.file)
        if pools is None:
            return 1

        return supervise(pools, sys.argv[1:] if argv is None else argv, args.workers, args.listen)
    from .server import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        if args.command == "proxy":
            try:
                return runner.run(_serve(args))
            except OSError as exc:
                print(f"balancerpool: {exc}", file=sys.stderr)
                return 1
        from .demo import run_demo

        try:
            runner.run(run_demo(args.listen, frontend=args.frontend))
        except OSError as exc:
            print(f"balancerpool demo: {exc}", file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
