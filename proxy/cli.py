"""``balancerpool``: run the proxy from a file, run the demo, or check a file."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .model import InvalidBalancerPool, parse_listen, parse_pools

#: Kept here (not imported from .server) so that ``check`` stays free of the server's imports.
FRONTENDS = ("fast", "aiohttp")
FRONTEND_HELP = ("HTTP front end: fast (httptools protocol, the default) or aiohttp "
                 "(aiohttp's low-level server)")


def _listen(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balancerpool", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    proxy = commands.add_parser("proxy", help="run the proxy from a BalancerPool file")
    proxy.add_argument("file", type=Path)
    proxy.add_argument("--listen", type=_listen, metavar="HOST:PORT",
                       help="listen here instead of the file's spec.listen")
    proxy.add_argument("--frontend", choices=FRONTENDS, default="fast", help=FRONTEND_HELP)

    demo = commands.add_parser("demo", help="start demo backends and the proxy on 127.0.0.1:8080")
    demo.add_argument("--listen", type=_listen, metavar="HOST:PORT")
    demo.add_argument("--frontend", choices=FRONTENDS, default="fast", help=FRONTEND_HELP)

    check = commands.add_parser("check", help="validate BalancerPool files and print every problem")
    check.add_argument("files", type=Path, nargs="+")
    return parser


def check(files: list[Path]) -> int:
    status = 0
    for path in files:
        try:
            pools = parse_pools(path.read_text(encoding="utf-8"))
        except InvalidBalancerPool as exc:
            print(f"{path}: invalid, {len(exc.errors)} problem(s):", file=sys.stderr)
            for error in exc.errors:
                print(f"  {error}", file=sys.stderr)
            status = 1
        except (OSError, UnicodeDecodeError) as exc:
            print(f"{path}: cannot be read: {exc}", file=sys.stderr)
            status = 1
        else:
            names = ", ".join(f"{p.name} ({len(p.members)} members)" for p in pools)
            print(f"{path}: ok: {names}")
    return status


async def _serve(file: Path, listen: tuple[str, int] | None, frontend: str) -> int:
    from .server import ProxyServer, run_until_signalled

    server = ProxyServer(file, listen, frontend=frontend)
    try:
        await server.start()
    except InvalidBalancerPool as exc:
        print(f"{file}: invalid, {len(exc.errors)} problem(s):", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        await server.close()
        return 1
    try:
        await run_until_signalled(server)
    finally:
        await server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "check":
        return check(args.files)
    from .server import new_event_loop, set_default_frontend

    # run_demo() creates its ProxyServer without naming a front end: it gets this default.
    set_default_frontend(args.frontend)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        if args.command == "proxy":
            try:
                return runner.run(_serve(args.file, args.listen, args.frontend))
            except OSError as exc:
                print(f"balancerpool: {exc}", file=sys.stderr)
                return 1
        from .demo import run_demo

        try:
            runner.run(run_demo(args.listen))
        except OSError as exc:
            print(f"balancerpool demo: {exc}", file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
