"""An API URL where nothing listens fails at once, naming the URL and the fix; a server that
refuses connections for a moment mid-run is still retried (issue 20, item 5).

Why: a refused connection at start was retried for 17 s in silence before "Cannot reach ...",
which looked like a hang. At the key check, a refusal means a wrong URL or port far more often
than a server about to come back, so it is said at once; later calls keep their retries.

The real run counts its API requests from inside the Snakemake process: this module doubles as
the wrapper (``python -m tests.test_first_hour_unreachable``, see tests/wrapped.py) that
prints a line for every request it sends.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from snakemake_executor_plugin_vastai.market.marketplace import (
    ApiUnreachable,
    Marketplace,
    RetryPolicy,
)
from tests.fakevast.harness import FakeVast
from tests.notvast import unused_port
from tests.workflows import assert_nothing_rented, fatal_error, one_rule_workflow
from tests.wrapped import run_wrapped, snakemake_patched_by

SENT = "API-REQUEST-SENT"
FAST_RETRY = RetryPolicy(attempts=4, first_delay=0.01)


def count_requests() -> None:
    """The wrapper's patch: a line on stderr for every HTTP request the process sends."""
    import requests.adapters

    send = requests.adapters.HTTPAdapter.send

    def counted(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        print(f"{SENT} {request.method} {request.url}", file=sys.stderr, flush=True)
        return send(self, request, *args, **kwargs)

    requests.adapters.HTTPAdapter.send = counted


def test_a_url_where_nothing_listens_stops_the_run_at_the_first_refusal(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")

    run = run_wrapped(
        "test_first_hour_unreachable",
        workdir,
        fakevast,
        "--vastai-api-url",
        url,
        jobs=1,
        timeout=120,
    )

    assert run.returncode != 0, run.output
    assert fatal_error(run.output) == (
        f"Cannot reach the Vast.ai API at {url}: connection refused. Check the network, or "
        "--vastai-api-url / VAST_URL. Nothing was rented."
    ), run.output
    sent = [line for line in run.output.splitlines() if line.startswith(SENT)]
    assert len(sent) == 1, sent  # asked once, not retried for 17 s
    assert url in sent[0], sent
    assert_nothing_rented(fakevast)


class Comeback:
    """An API on a port that refuses connections (bound, not listening) until ``listen``."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps({"instances": [], "id": 1}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread: threading.Thread | None = None

    def listen(self) -> None:
        if self._thread is None:
            self.server.server_activate()
            self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()


@contextmanager
def comeback() -> Iterator[Comeback]:
    server = Comeback()
    try:
        yield server
    finally:
        server.close()


def back_after_first_try(owner: object, name: str, server: Comeback) -> list[str]:
    """Count the calls of ``owner``'s ``name`` (an SDK method or function); the server
    listens once the first one was refused."""
    calls: list[str] = []
    real: Callable[..., Any] = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        try:
            return real(*args, **kwargs)
        finally:
            server.listen()

    setattr(owner, name, counted)
    return calls


def test_the_key_check_does_not_retry_a_refused_connection() -> None:
    with comeback() as server:
        market = Marketplace("key-of-the-test-0123", server.url, FAST_RETRY)
        calls = back_after_first_try(market._sdk, "show_user", server)
        with pytest.raises(ApiUnreachable, match="connection refused"):
            market.check_credentials()
    assert calls == ["show_user"]


def test_a_server_refusing_for_a_moment_mid_run_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The instance list's page call (the SDK's function the list goes through)."""
    import vastai.api.instances as sdk_instances

    with comeback() as server, monkeypatch.context() as patch:
        market = Marketplace("key-of-the-test-0123", server.url, FAST_RETRY)
        patch.setattr(sdk_instances, "show_instances_v1", sdk_instances.show_instances_v1)
        calls = back_after_first_try(sdk_instances, "show_instances_v1", server)
        assert market.list_instances() == []
    assert calls == ["show_instances_v1", "show_instances_v1"]


if __name__ == "__main__":
    snakemake_patched_by(count_requests)
