"""Command line of the simulated server: ``python -m runner.sim --port 8801``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading

from aiohttp import web

from runner.errors import EndpointError, RunnerError
from runner.sim.profile import load_profile
from runner.sim.server import DEFAULT_MODEL, build_app

logger = logging.getLogger("runner.sim")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runner.sim", description=__doc__)
    parser.add_argument("--port", type=int, default=8801, help="TCP port; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--profile", default="default", help="bundled profile name or path to a .yaml profile")
    parser.add_argument("--seed", type=int, default=0, help="seed of generated texts and early stops")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the bundled qwen2.5)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name served and accepted in requests")
    parser.add_argument("--log", default=None, help="file for the per-request ground-truth log (JSON lines)")
    parser.add_argument(
        "--stop-on-stdin-close",
        action="store_true",
        help="exit when standard input closes, so a parent that dies takes the server with it",
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    app = build_app(
        load_profile(args.profile), seed=args.seed, tokenizer=args.tokenizer, model=args.model, log_path=args.log
    )
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        raise EndpointError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); pass another --port") from None
    port = sock.getsockname()[1]
    # Streams still open one second after SIGTERM are cancelled, so a stop waits about one second for them at most.
    app_runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await app_runner.setup()
    try:
        await web.SockSite(app_runner, sock, backlog=1024).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if args.stop_on_stdin_close:
            threading.Thread(target=_wait_for_stdin_close, args=(loop, stop), daemon=True).start()
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"listening on http://{host}:{port}", flush=True)
        await stop.wait()
        logger.info("stopping simulated server on port %s", port)
    finally:
        await app_runner.cleanup()


def _wait_for_stdin_close(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    # os.read on the raw descriptor, because a daemon thread blocked inside sys.stdin's buffered
    # reader holds its lock and makes interpreter shutdown abort.
    while os.read(0, 4096):
        pass
    loop.call_soon_threadsafe(stop.set)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import uvloop  # optional: a faster event loop when installed

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(args))
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
