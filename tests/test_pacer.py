"""The client-side pacer: every thread and every process of one key and URL share one book,
so together they never exceed an endpoint's limit. Checked with real threads and real
processes in random order, by the times each call was allowed; the limits are scaled down
(fractions of a second) so the test is about the invariant, not about Vast.ai's figures."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastai.market.pacer import (
    LIMITS,
    SLACK_SECONDS,
    Limit,
    Pacer,
    Unpaced,
    book_path,
)

FAST = {"create": Limit(1, 0.3, penalty=1.0), "search": Limit(3, 1.0)}


def most_in_any_window(times: list[float], seconds: float) -> int:
    times = sorted(times)
    return max(
        (sum(1 for t in times[i:] if t - start < seconds) for i, start in enumerate(times)),
        default=0,
    )


def test_the_limits_are_vasts_own() -> None:
    """vast-api.md section 10: search 10 a minute, a create every 4.5 s with a 12 s penalty,
    list 1 s, show 2 s, destroy 3 s, manage and reboot 1 s."""
    assert LIMITS["search"] == Limit(10, 60.0)
    assert LIMITS["create"] == Limit(1, 4.5, penalty=12.0)
    assert (LIMITS["list"], LIMITS["show"], LIMITS["destroy"], LIMITS["manage"]) == (
        Limit(1, 1.0),
        Limit(1, 2.0),
        Limit(1, 3.0),
        Limit(1, 1.0),
    )


def test_many_threads_in_random_order_keep_every_limit(tmp_path: Path) -> None:
    pacer = Pacer(tmp_path / "book.json", FAST)
    allowed: dict[str, list[float]] = {"create": [], "search": []}
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(3):
            endpoint = rng.choice(["create", "search"])
            time.sleep(rng.random() * 0.05)
            pacer.wait_turn(endpoint)
            with lock:
                allowed[endpoint].append(time.time())

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread never got its turn"

    assert sum(len(times) for times in allowed.values()) == 18
    assert most_in_any_window(allowed["create"], 0.3) <= 1, allowed["create"]
    assert most_in_any_window(allowed["search"], 1.0) <= 3, allowed["search"]


# Run as a separate process: books `count` creates in the shared book, prints their times.
CHILD = """\
import json, sys, time
from pathlib import Path
from snakemake_executor_plugin_vastai.market.pacer import Limit, Pacer
pacer = Pacer(Path(sys.argv[1]), {"create": Limit(1, 0.3)})
times = []
for _ in range(int(sys.argv[2])):
    pacer.wait_turn("create")
    times.append(time.time())
print(json.dumps(times))
"""


def test_processes_of_the_same_key_share_the_allowance(tmp_path: Path) -> None:
    """Two workflows (or a workflow and the helper command) of one key: neither knows of
    the other, yet their calls together keep the limit."""
    book = tmp_path / "book.json"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(book), "4"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    times = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        times += json.loads(out)

    assert len(times) == 12
    assert most_in_any_window(times, 0.3) <= 1, sorted(times)


def test_a_refusal_blocks_the_endpoint_for_its_penalty(tmp_path: Path) -> None:
    """A 429 that came anyway (another machine on the same key): Vast.ai blocks creates for
    12 s after a too-early one, so the next create waits the penalty, not one interval."""
    pacer = Pacer(tmp_path / "book.json", FAST)
    pacer.wait_turn("create")
    pacer.refused("create")

    waited = pacer.wait_turn("create")

    assert waited >= FAST["create"].penalty


def test_a_wait_ends_when_the_caller_gives_up(tmp_path: Path) -> None:
    pacer = Pacer(tmp_path / "book.json", {"create": Limit(1, 3600.0)})
    pacer.wait_turn("create")

    with pytest.raises(Unpaced):
        pacer.wait_turn("create", give_up=lambda: True)


def test_a_damaged_book_starts_afresh(tmp_path: Path) -> None:
    book = tmp_path / "book.json"
    book.write_text("{not json")

    assert Pacer(book, FAST).wait_turn("create") < SLACK_SECONDS


def test_the_book_is_named_by_a_digest_never_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/cache")
    one = book_path("https://console.vast.ai", "secret-key-1")
    other_url = book_path("http://127.0.0.1:8000", "secret-key-1")

    assert one.parent == Path("/cache/snakemake-vastai")
    assert "secret-key-1" not in str(one)
    assert one != other_url != book_path("https://console.vast.ai", "secret-key-2")


def test_a_batch_holds_the_allowance_of_all_its_calls(tmp_path: Path) -> None:
    """A batch destroy of three ids goes when one destroy may, and the next destroy waits
    for three intervals (the fake charges a batch per id, the stricter reading)."""
    pacer = Pacer(tmp_path / "book.json", {"destroy": Limit(1, 0.5)})
    pacer.wait_turn("destroy", weight=3)

    assert pacer.wait_turn("destroy") >= 3 * 0.5


def test_a_refused_search_waits_one_interval_not_the_whole_window(tmp_path: Path) -> None:
    """Search has no penalty: after a 429 that came anyway, the next search may go one
    interval later (Vast.ai's 10 a minute: 6 s), not after the minute's whole window."""
    book = tmp_path / "book.json"
    pacer = Pacer(book, FAST, clock=lambda: 1000.0)

    pacer.refused("search")

    interval = FAST["search"].seconds / FAST["search"].calls
    blocked = json.loads(book.read_text())["blocked"]["search"]
    assert blocked == pytest.approx(1000.0 + interval + SLACK_SECONDS)
