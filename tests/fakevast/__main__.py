"""``python -m tests.fakevast``: serve a fake marketplace until SIGTERM or SIGINT.

The first stdout line is ``URL http://127.0.0.1:<port>`` (flushed), so a parent process can read
where to connect; the second is the ``export`` line of the plugin's URL and key variables, for a
user to paste into the shell that runs Snakemake. Everything else goes to stderr. On shutdown
every instance is destroyed.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .catalog import DEFAULT_OFFERS, Catalog
from .limits import RateLimits
from .market import Market
from .server import FakeVastServer


def _milliseconds(text: str) -> float:
    """A round-trip time: a finite number of milliseconds, >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds >= 0, got {text!r}")
    return value


def _quota(text: str) -> int:
    """A daily search quota: a whole number of searches, >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of searches >= 0, got {text!r}")
    return value


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fakevast", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--boot-seconds", type=float, default=0.0, help="create -> running delay")
    parser.add_argument(
        "--restart-seconds",
        type=float,
        help="a start's delay once it has its GPU (default: the boot's, at most 30)",
    )
    parser.add_argument(
        "--rtt-ms",
        type=_milliseconds,
        default=0.0,
        help="simulated round-trip time of every SSH connection (half each way), e.g. 50",
    )
    parser.add_argument("--offers", type=Path, default=DEFAULT_OFFERS, help="catalogue JSON")
    parser.add_argument("--api-key", default="fake-key", help="the user's key")
    parser.add_argument("--state-dir", type=Path, help="instances' files (default: a temp dir)")
    parser.add_argument("--log-requests", action="store_true", help="log each request to stderr")
    parser.add_argument(
        "--no-rate-limits",
        dest="rate_limits",
        action="store_false",
        help="answer every call at once (default: Vast.ai's per-endpoint rate limits)",
    )
    parser.add_argument(
        "--search-quota",
        type=_quota,
        help="searches per API key per UTC day (default: unlimited)",
    )
    parser.add_argument(
        "--exit-on-eof",
        action="store_true",
        help="also shut down when stdin closes (the harness's lifeline: a killed parent stops us)",
    )
    return parser.parse_args(argv)


def export_line(url: str, api_key: str) -> str:
    """The shell line that points the plugin (and ``snakemake-vastai``) at this fake: the
    environment variables it reads first (only its flags come before them), so a key or URL
    already set up for Vast.ai does not win over them."""
    pairs = {"SNAKEMAKE_VASTAI_API_URL": url, "SNAKEMAKE_VASTAI_API_KEY": api_key}
    return "export " + " ".join(f"{name}={shlex.quote(value)}" for name, value in pairs.items())


def _stop_at_eof(stop: threading.Event) -> None:
    """Raw reads: a daemon thread blocked in sys.stdin would hold its lock at exit and abort."""
    while os.read(sys.stdin.fileno(), 4096):
        pass
    stop.set()


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    catalog = Catalog.load(args.offers)
    with tempfile.TemporaryDirectory(prefix="fakevast-") as scratch:
        state_root = args.state_dir or Path(scratch)
        state_root.mkdir(parents=True, exist_ok=True)
        limits = RateLimits(enabled=args.rate_limits, search_quota=args.search_quota)
        market = Market(
            catalog, args.boot_seconds, state_root, args.rtt_ms, limits, args.restart_seconds
        )
        server = FakeVastServer(args.port, market, args.api_key, args.log_requests)
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        if args.exit_on_eof:
            threading.Thread(target=_stop_at_eof, args=(stop,), daemon=True).start()
        market.start()
        serving = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="fakevast-http", daemon=True
        )
        serving.start()
        url = f"http://127.0.0.1:{server.port}"
        print(f"URL {url}", export_line(url, args.api_key), sep="\n", flush=True)
        while not stop.wait(0.5):
            pass
        server.shutdown()
        server.server_close()
        market.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
