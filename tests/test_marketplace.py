"""marketplace.py against the fake over real HTTP with the real SDK: retries, rate limits, the
create that must not be repeated, auth, gone offers, confirmed destroys and secret scrubbing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from snakemake_executor_plugin_vastai.marketplace import (
    FATAL_BOOT_MESSAGES,
    AuthError,
    CreateOutcomeUnknown,
    InstanceInfo,
    Marketplace,
    MarketplaceError,
    OfferGone,
    RetryPolicy,
    resolve_api_key,
    resolve_api_url,
)
from snakemake_executor_plugin_vastai.settings import DEFAULT_API_URL
from tests.fakevast.clients import DEFAULT_IMAGE
from tests.fakevast.faults import BOOT_FAILURES
from tests.fakevast.harness import FakeVast
from tests.instances import DISK_GB, QUERY, is_running, market_for, rent, wait_for

SEARCH = "POST /api/v0/bundles/"
CREATE = "PUT /api/v0/asks/{id}/"
LIST = "GET /api/v1/instances/"
SHOW = "GET /api/v0/instances/{id}/"
DELETE = "DELETE /api/v0/instances/{id}/"


def calls(fake: FakeVast, endpoint: str) -> int:
    return fake.ledger()["api_calls"].get(endpoint, 0)


def search(market: Marketplace) -> list[Any]:
    return market.search(QUERY, "dph_total", DISK_GB)


# -- retries --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_search_survives_a_burst_of_retryable_errors(fakevast: FakeVast, status: int) -> None:
    fakevast.set_faults({"http": [{"status": status, "count": 3, "endpoint": SEARCH}]})
    offers = search(market_for(fakevast))
    assert offers, "the search should succeed once the burst is over"
    assert calls(fakevast, SEARCH) == 4  # three refusals, then the answer


def test_retries_give_up_after_the_policy_and_say_why(fakevast: FakeVast) -> None:
    fakevast.set_faults({"http": [{"status": 429, "count": None, "endpoint": SEARCH}]})
    market = market_for(fakevast, RetryPolicy(attempts=3, first_delay=0.01))
    with pytest.raises(MarketplaceError, match="HTTP 429"):
        search(market)
    assert calls(fakevast, SEARCH) == 3


def test_search_quota_is_not_retried(fakevast: FakeVast) -> None:
    """The daily quota resets at midnight UTC: retrying only burns requests."""
    quota = {"status": 429, "endpoint": SEARCH, "body": {"error": "search_quota_exceeded"}}
    fakevast.set_faults({"http": [quota]})
    with pytest.raises(MarketplaceError, match="search_quota_exceeded"):
        search(market_for(fakevast))
    assert calls(fakevast, SEARCH) == 1


def test_retry_after_is_honoured(fakevast: FakeVast) -> None:
    fakevast.set_faults({"http": [{"status": 429, "retry_after": 1, "endpoint": SEARCH}]})
    market = market_for(fakevast, RetryPolicy(attempts=3, first_delay=0.01))
    started = time.monotonic()
    assert search(market)
    elapsed = time.monotonic() - started
    assert elapsed >= 1.0, f"retried after {elapsed:.2f} s, Retry-After said 1 s"


# -- create -----------------------------------------------------------------------------------


def test_failing_create_is_not_retried_and_its_outcome_is_unknown(fakevast: FakeVast) -> None:
    """A 5xx on create may hide a create that happened: not retried (a second create could
    rent twice), reported as unknown for the pool to settle by label."""
    fakevast.set_faults({"http": [{"status": 503, "count": None, "endpoint": CREATE}]})
    market = market_for(fakevast)
    with pytest.raises(CreateOutcomeUnknown, match="HTTP 503"):
        rent(market, "snakemake-vastai:run1:create-503")
    assert calls(fakevast, CREATE) == 1
    assert fakevast.ledger()["instances"] == []


@pytest.mark.parametrize("how", ["answer lost after the effect", "client timed out"])
def test_create_whose_answer_is_lost_is_found_by_label(fakevast: FakeVast, how: str) -> None:
    """The create is processed but its answer never arrives: no second create is sent, and
    the unique label finds the instance that was made after all."""
    market = market_for(fakevast)
    if how == "client timed out":
        # The client gives up after 1 s; the fake makes the instance at 2 s.
        fakevast.set_faults({"http": [{"latency": 2.0, "endpoint": CREATE}]})
        market._sdk.client.timeout = 1.0  # the real SDK's own per-request timeout, made short
    else:
        fakevast.set_faults({"http": [{"status": 503, "after_effect": True, "endpoint": CREATE}]})
    label = "snakemake-vastai:run1:lost-answer"
    with pytest.raises(CreateOutcomeUnknown):
        rent(market, label)
    fakevast.wait_for(lambda: market.find_by_label(label), timeout=10)
    found = market.find_by_label(label)
    assert found is not None
    try:
        [row] = fakevast.ledger()["instances"]
        assert row["id"] == found.id and row["label"] == label
        assert calls(fakevast, CREATE) == 1
    finally:
        market.destroy(found.id)


@pytest.mark.parametrize("how", ["rented by us", "taken by someone else", "withdrawn"])
def test_offer_gone(fakevast: FakeVast, how: str) -> None:
    market = market_for(fakevast)
    offer = search(market)[0]
    first = None
    if how == "rented by us":
        first = rent(market, "snakemake-vastai:run1:first")
        offer_id = offer.id
    elif how == "taken by someone else":
        fakevast.set_faults({"offers": {str(offer.id): {"gone": True}}})
        offer_id = offer.id
    else:
        offer_id = 1  # no such offer in the catalogue
    try:
        with pytest.raises(OfferGone):
            market.rent(offer_id, image=DEFAULT_IMAGE, disk_gb=DISK_GB, label="x:y:z", onstart="")
        assert [row["id"] for row in fakevast.alive_instances()] == ([first] if first else [])
    finally:
        if first is not None:
            market.destroy(first)


# -- auth and secrets -----------------------------------------------------------------------------

WRONG_KEY = "wrong-key-0123456789abcdef"

CALLS: dict[str, Callable[[Marketplace], object]] = {
    "check_credentials": lambda m: m.check_credentials(),
    "search": search,
    "list": lambda m: m.list_instances(),
    "rent": lambda m: m.rent(9210022, image=DEFAULT_IMAGE, disk_gb=16, label="a:b:c", onstart=""),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_wrong_key_is_an_auth_error_without_the_key(
    fakevast: FakeVast, call: Callable[[Marketplace], object]
) -> None:
    market = Marketplace(WRONG_KEY, fakevast.url, RetryPolicy(attempts=3, first_delay=0.01))
    with pytest.raises(AuthError) as caught:
        call(market)
    assert "API key" in str(caught.value)
    assert WRONG_KEY not in str(caught.value)
    assert fakevast.ledger()["instances"] == []


def test_secrets_are_scrubbed_from_api_errors(fakevast: FakeVast) -> None:
    """The fake echoes a rejected image reference; a registry token in it must not surface."""
    market = market_for(fakevast)
    market.add_secret("tok-SECRET-42")
    with pytest.raises(MarketplaceError) as caught:
        rent(market, "snakemake-vastai:run1:bad-image", image="registry.example/tok-SECRET-42 !")
    message = str(caught.value)
    assert "registry.example/***" in message  # the echo is there, the secret is not
    assert "tok-SECRET-42" not in message
    assert fakevast.ledger()["instances"] == []


def test_secrets_are_scrubbed_from_transport_errors() -> None:
    api_key = "key-SECRET-7"
    market = Marketplace(api_key, "http://127.0.0.1:9/tok-SECRET-8", RetryPolicy(attempts=2))
    market.add_secret("tok-SECRET-8")
    with pytest.raises(MarketplaceError, match="unreachable") as caught:
        market.list_instances()
    assert "SECRET" not in str(caught.value)
    assert market.redact(f"k={api_key} t=tok-SECRET-8") == "k=*** t=***"


# -- destroy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "attempts"),
    [(0, 4), (1, 4), (3, 2)],  # none; one retried inside a call; more than a call's budget
    ids=["clean", "5xx-once", "5xx-beyond-one-call"],
)
def test_destroy_confirms_the_instance_is_gone(
    fakevast: FakeVast, failures: int, attempts: int
) -> None:
    market = market_for(fakevast, RetryPolicy(attempts=attempts, first_delay=0.01))
    instance_id = rent(market, "snakemake-vastai:run1:destroy")
    if failures:
        fakevast.set_faults({"http": [{"status": 503, "count": failures, "endpoint": DELETE}]})
    shows_before = calls(fakevast, SHOW)
    market.destroy(instance_id, confirm_timeout=20)
    assert fakevast.alive_instances() == []
    assert calls(fakevast, DELETE) == failures + 1
    assert calls(fakevast, SHOW) > shows_before, "destroy must look whether it worked"
    assert market.show(instance_id) is None


def test_destroy_of_a_gone_instance_is_fine(fakevast: FakeVast) -> None:
    market = market_for(fakevast)
    instance_id = rent(market, "snakemake-vastai:run1:twice")
    market.destroy(instance_id)
    market.destroy(instance_id)  # 404 no_such_instance: already what we wanted
    assert calls(fakevast, DELETE) == 2


# -- logs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("not_ready", [0, 2], ids=["ready", "upload-lag"])
def test_log_tail_has_the_last_lines_with_secrets_redacted(
    fakevast: FakeVast, not_ready: int
) -> None:
    """What a boot error quotes: the instance's own log, through the two-step logs API."""
    market = market_for(fakevast)
    market.add_secret("forwarded-s3cret")
    fakevast.set_faults({"logs_not_ready": not_ready})
    offer = market.search(QUERY, "dph_total", DISK_GB, limit=1)[0]
    onstart = "for i in $(seq 1 50); do echo line $i; done; echo token=forwarded-s3cret"
    instance_id = market.rent(
        offer.id,
        image=DEFAULT_IMAGE,
        disk_gb=DISK_GB,
        label="snakemake-vastai:r:l",
        onstart=onstart,
    )
    try:
        wait_for(market, instance_id, is_running)
        deadline = time.monotonic() + 10
        while "token=" not in (tail := market.log_tail(instance_id, lines=5)):
            assert time.monotonic() < deadline, tail
        assert tail.splitlines() == ["line 47", "line 48", "line 49", "line 50", "token=***"]
    finally:
        market.destroy(instance_id)


# -- instance rows --------------------------------------------------------------------------------


@pytest.mark.parametrize("message", BOOT_FAILURES, ids=[m[:24] for m in BOOT_FAILURES])
def test_fatal_boot_message_from_the_fake(fakevast: FakeVast, message: str) -> None:
    fakevast.set_faults({"next_creates": {"boot_failure": message}})
    market = market_for(fakevast)
    instance_id = rent(market, "snakemake-vastai:run1:boot-failure")
    try:
        info = wait_for(market, instance_id, lambda i: i.status_msg == message)
        assert info.fatal_boot_message == message
        assert info.actual_status != "running"
    finally:
        market.destroy(instance_id)


@pytest.mark.parametrize("pattern", FATAL_BOOT_MESSAGES)
def test_fatal_boot_message_is_case_insensitive(pattern: str) -> None:
    text = f"Docker said: {pattern.upper()} (details)"
    assert InstanceInfo.from_api({"id": 1, "status_msg": text}).fatal_boot_message == text


@pytest.mark.parametrize(
    "message", ["", "Pulling image vastai/base-image", "success, running vastai/base/ssh"]
)
def test_healthy_status_messages_are_not_fatal(message: str) -> None:
    assert InstanceInfo.from_api({"id": 1, "status_msg": message}).fatal_boot_message is None


@pytest.mark.parametrize(
    ("actual", "intended", "lost"),
    [
        ("running", "running", False),
        ("loading", "running", False),
        (None, "running", False),
        ("offline", "running", True),
        ("unknown", "running", True),
        ("exited", "running", True),
        ("stopped", "stopped", True),
        ("running", "stopped", True),  # outbid: on its way down
    ],
)
def test_lost_rows(actual: str | None, intended: str, lost: bool) -> None:
    row = {"id": 1, "actual_status": actual, "intended_status": intended}
    assert InstanceInfo.from_api(row).lost is lost


@pytest.mark.parametrize("fault", ["offline", "stopped"])
def test_lost_hosts_from_the_fake(fakevast: FakeVast, fault: str) -> None:
    market = market_for(fakevast)
    instance_id = rent(market, "snakemake-vastai:run1:lost")
    try:
        assert not wait_for(market, instance_id, is_running).lost
        fakevast.set_faults({"instances": {str(instance_id): {fault: True}}})
        assert wait_for(market, instance_id, lambda i: i.actual_status == fault).lost
    finally:
        market.destroy(instance_id)


# -- key and URL resolution ------------------------------------------------------------------


@pytest.fixture
def key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A HOME and XDG_CONFIG_HOME of our own, with no key anywhere yet."""
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    return {"xdg": xdg / "vastai" / "vast_api_key", "home": home / ".vast_api_key"}


def write_key(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"  {key}\n")


@pytest.mark.parametrize("winner", ["option", "env", "xdg", "home"])
def test_resolve_api_key_order(
    key_sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch, winner: str
) -> None:
    """Every source below the winner is present too, and loses."""
    order = ["option", "env", "xdg", "home"]
    present = order[order.index(winner) :]
    if "env" in present:
        monkeypatch.setenv("VAST_API_KEY", " from-env ")
    for name in ("xdg", "home"):
        if name in present:
            write_key(key_sources[name], f"from-{name}")
    explicit = " from-option\n" if "option" in present else None
    assert resolve_api_key(explicit) == f"from-{winner}"


def test_xdg_defaults_to_dot_config(
    key_sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME")
    write_key(Path.home() / ".config" / "vastai" / "vast_api_key", "from-dot-config")
    write_key(key_sources["home"], "from-home")
    assert resolve_api_key(None) == "from-dot-config"


def test_missing_key_says_where_to_put_one(key_sources: dict[str, Path]) -> None:
    write_key(key_sources["xdg"], "")  # an empty key file is no key
    with pytest.raises(AuthError) as caught:
        resolve_api_key(None)
    message = str(caught.value)
    for hint in ("--vastai-api-key", "VAST_API_KEY", "vastai set api-key", "Nothing was rented"):
        assert hint in message


@pytest.mark.parametrize(
    ("option", "env", "expected"),
    [
        ("http://option:1/", "http://env:2", "http://option:1"),
        (None, "http://env:2//", "http://env:2"),
        (None, None, DEFAULT_API_URL),
    ],
)
def test_resolve_api_url(
    monkeypatch: pytest.MonkeyPatch, option: str | None, env: str | None, expected: str
) -> None:
    if env is None:
        monkeypatch.delenv("VAST_URL", raising=False)
    else:
        monkeypatch.setenv("VAST_URL", env)
    assert resolve_api_url(option) == expected
