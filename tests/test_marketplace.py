"""marketplace.py against the fake over real HTTP with the real SDK: retries, rate limits, the
create that must not be repeated, auth, gone offers, confirmed destroys and secret scrubbing."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from snakemake_executor_plugin_vastai.market.defaults import DEFAULT_API_URL
from snakemake_executor_plugin_vastai.market.marketplace import (
    FATAL_BOOT_MESSAGES,
    HELPER_OPTIONS,
    KEY_VARIABLES,
    PLUGIN_OPTIONS,
    URL_VARIABLES,
    WRONG_SHAPE,
    ApiOptions,
    AuthError,
    CreateOutcomeUnknown,
    InstanceInfo,
    Marketplace,
    MarketplaceError,
    OfferGone,
    RetryPolicy,
    _network_reason,
    key_origin,
    resolve_api_key,
    resolve_api_url,
)
from tests.fakevast.clients import DEFAULT_IMAGE
from tests.fakevast.faults import BOOT_FAILURES
from tests.fakevast.harness import FakeVast
from tests.instances import DISK_GB, FAST_RETRY, QUERY, is_running, market_for, rent, wait_for
from tests.notvast import WEB_PAGE, not_vast, unused_port

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
    with pytest.raises(MarketplaceError, match="daily offer-search quota for this API key"):
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
    with pytest.raises(MarketplaceError, match="Cannot reach the Vast") as caught:
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
    market.destroy(instance_id, budget=20)
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
    for name in KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return {"xdg": xdg / "vastai" / "vast_api_key", "home": home / ".vast_api_key"}


def write_key(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"  {key}\n")


KEY_ORDER = ["option", "SNAKEMAKE_VASTAI_API_KEY", "VAST_API_KEY", "xdg", "home"]


def provide_keys(
    present: list[str], key_sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> str | None:
    """Put a key ``from-<source>`` into each present source; returns the option's value."""
    for name in present:
        if name in KEY_VARIABLES:
            monkeypatch.setenv(name, f" from-{name} ")
        elif name in key_sources:
            write_key(key_sources[name], f"from-{name}")
    return " from-option\n" if "option" in present else None


@pytest.mark.parametrize("winner", KEY_ORDER)
def test_resolve_api_key_order(
    key_sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch, winner: str
) -> None:
    """Every source below the winner is present too, and loses."""
    explicit = provide_keys(KEY_ORDER[KEY_ORDER.index(winner) :], key_sources, monkeypatch)
    assert resolve_api_key(explicit) == f"from-{winner}"
    assert resolve_api_key(explicit, HELPER_OPTIONS) == f"from-{winner}"


@pytest.mark.parametrize("winner", KEY_ORDER)
def test_key_origin_names_the_source_and_never_the_key(
    key_sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch, winner: str
) -> None:
    explicit = provide_keys(KEY_ORDER[KEY_ORDER.index(winner) :], key_sources, monkeypatch)
    key = resolve_api_key(explicit)
    expected = {
        "option": "--vastai-api-key",
        "xdg": f"the key file {key_sources['xdg']}",
        "home": f"the key file {key_sources['home']}",
    }.get(winner, winner)
    assert key_origin(key) == expected
    assert key not in key_origin(key)
    if winner == "option":
        assert key_origin(key, HELPER_OPTIONS) == "--api-key"


def test_xdg_defaults_to_dot_config(
    key_sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME")
    write_key(Path.home() / ".config" / "vastai" / "vast_api_key", "from-dot-config")
    write_key(key_sources["home"], "from-home")
    assert resolve_api_key(None) == "from-dot-config"


@pytest.mark.parametrize(
    ("options", "flag", "other_flag", "outcome"),
    [
        (PLUGIN_OPTIONS, "--vastai-api-key", "--api-key", "Nothing was rented."),
        (HELPER_OPTIONS, "--api-key", "--vastai-api-key", ""),
    ],
    ids=["plugin", "helper"],
)
def test_missing_key_names_the_flag_of_the_program_run(
    key_sources: dict[str, Path], options: ApiOptions, flag: str, other_flag: str, outcome: str
) -> None:
    write_key(key_sources["xdg"], "")  # an empty key file is no key
    with pytest.raises(AuthError) as caught:
        resolve_api_key(None, options)
    assert (
        str(caught.value)
        == (
            f"No Vast.ai API key found. Pass {flag}, or set SNAKEMAKE_VASTAI_API_KEY or "
            f"VAST_API_KEY, or run 'vastai set api-key <key>'. {outcome}"
        ).strip()
    )
    assert other_flag not in str(caught.value)


@pytest.mark.parametrize(
    ("option", "snakemake_env", "vast_env", "expected"),
    [
        ("http://option:1/", "http://snakemake:3", "http://env:2", "http://option:1"),
        (None, "http://snakemake:3/", "http://env:2", "http://snakemake:3"),
        (None, None, "http://env:2//", "http://env:2"),
        (None, None, None, DEFAULT_API_URL),
    ],
)
def test_resolve_api_url(
    monkeypatch: pytest.MonkeyPatch,
    option: str | None,
    snakemake_env: str | None,
    vast_env: str | None,
    expected: str,
) -> None:
    for name, value in zip(URL_VARIABLES, (snakemake_env, vast_env), strict=True):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert resolve_api_url(option) == expected


@pytest.mark.parametrize("url", ["console.vast.ai", "ftp://example.org", "http://"])
def test_an_api_url_that_is_no_http_url_is_refused(url: str) -> None:
    with pytest.raises(MarketplaceError) as caught:
        resolve_api_url(url, HELPER_OPTIONS)
    assert str(caught.value) == (
        f"The Vast.ai API URL {url!r} is not an http:// or https:// URL with a host. "
        "Check --api-url / VAST_URL."
    )


# -- the credential check: one message naming the one thing to fix ----------------------------


def checked(url: str, options: ApiOptions = PLUGIN_OPTIONS, key: str = WRONG_KEY) -> str:
    """The message of the start-up check against ``url`` (with retries measured in ms)."""
    market = Marketplace(key, url, FAST_RETRY)
    with pytest.raises(MarketplaceError) as caught:
        market.check_credentials(options)
    assert key not in str(caught.value)
    return str(caught.value)


def test_refused_connection_names_the_network_and_the_url() -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    assert checked(url) == (
        f"Cannot reach the Vast.ai API at {url}: connection refused. Check the network, or "
        "--vastai-api-url / VAST_URL. Nothing was rented."
    )
    assert checked(url, HELPER_OPTIONS) == (
        f"Cannot reach the Vast.ai API at {url}: connection refused. Check the network, or "
        "--api-url / VAST_URL."
    )


def test_unknown_host_names_the_network_and_the_url() -> None:
    message = checked("http://vast.invalid", HELPER_OPTIONS)  # .invalid never resolves
    assert message.startswith("Cannot reach the Vast.ai API at http://vast.invalid: host name ")
    assert message.endswith(". Check the network, or --api-url / VAST_URL.")
    assert "key" not in message


def test_a_timeout_is_named_as_such() -> None:
    """The SDK waits 120 s for an answer, so the reason is drawn from a real timeout here."""
    import requests

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(requests.Timeout) as caught:
            requests.get(f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.2)
    assert _network_reason(caught.value) == "timed out"


@pytest.mark.parametrize(
    ("status", "body", "content_type", "reason"),
    [
        (200, WEB_PAGE, "text/html", "not JSON"),
        (200, b"[1, 2]", "application/json", WRONG_SHAPE),
        (404, WEB_PAGE, "text/html", "HTTP 404 for the user account"),
    ],
    ids=["web-page", "wrong-shape", "no-such-endpoint"],
)
def test_an_answer_that_is_not_the_vast_api_says_so(
    status: int, body: bytes, content_type: str, reason: str
) -> None:
    with not_vast(status, body, content_type) as server:
        message = checked(server.url, HELPER_OPTIONS)
    assert message == (
        f"The Vast.ai API at {server.url} sent an answer that cannot be read: {reason}. Is "
        f"{server.url} the Vast.ai API? Check --api-url / VAST_URL."
    )


@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_key_names_where_it_came_from(
    key_sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    monkeypatch.setenv("VAST_API_KEY", WRONG_KEY)
    body = b'{"success": false, "error": "auth_error", "msg": "Invalid user key"}'
    with not_vast(status, body, "application/json") as server:
        message = checked(server.url)
    assert message == (
        f"Vast.ai rejected the API key from VAST_API_KEY (HTTP {status}). Check that key, or "
        "pass another with --vastai-api-key. Nothing was rented."
    )


def test_a_rejected_key_from_the_fake(
    fakevast: FakeVast, key_sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_key(key_sources["home"], WRONG_KEY)
    assert checked(fakevast.url, HELPER_OPTIONS) == (
        f"Vast.ai rejected the API key from the key file {key_sources['home']} (HTTP 401). "
        "Check that key, or pass another with --api-key."
    )
    assert fakevast.ledger()["api_calls"] == {"GET /api/v0/users/current/": 1}


def test_the_right_key_passes_the_check(fakevast: FakeVast) -> None:
    Marketplace(fakevast.api_key, fakevast.url, FAST_RETRY).check_credentials(HELPER_OPTIONS)


def test_a_garbled_second_page_of_the_list_is_asked_again(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """30 instances come in two pages; the second arrives cut halfway. The list is whole
    anyway: a garbled page is retried like a server error, never taken for a shorter list
    (which would make the pool believe instances gone that still bill)."""
    from tests.fakevast.clients import rent as rent_one
    from tests.fakevast.clients import sdk
    from tests.test_market_rules import sixteen_offers

    offers = tmp_path / "offers.json"
    sixteen_offers(offers)
    rows = json.loads(offers.read_text())
    offers.write_text(json.dumps([*rows, *({**r, "id": r["id"] + 100} for r in rows)]))
    fake = fakevast_factory(offers=offers)
    vast = sdk(fake)
    ids = [rent_one(vast, query="num_gpus=1") for _ in range(30)]
    list_v1 = "GET /api/v1/instances/"
    fake.set_faults({"http": [{"garbled": True, "skip": 1, "endpoint": list_v1}]})
    market = Marketplace(fake.api_key, fake.url, FAST_RETRY)

    try:
        listed = market.list_instances()
    finally:
        for instance_id in ids:
            vast.destroy_instance(id=instance_id)

    assert sorted(row.id for row in listed) == sorted(ids)
    garbled = [c for c in fake.requests() if c["endpoint"] == list_v1 and c["garbled"]]
    assert len(garbled) == 1  # the second page, cut halfway, then asked again


def test_a_list_longer_than_a_page_is_paced_page_by_page(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """30 instances come in two pages of the list, and each page is a call under the list
    limit (one a second): the later page waits its turn instead of being refused."""
    from tests.fakevast.clients import rent as rent_one
    from tests.fakevast.clients import sdk
    from tests.test_market_rules import sixteen_offers

    offers = tmp_path / "offers.json"
    sixteen_offers(offers)
    rows = json.loads(offers.read_text())
    offers.write_text(json.dumps([*rows, *({**r, "id": r["id"] + 100} for r in rows)]))
    fake = fakevast_factory(offers=offers)  # limits off while the 30 are created
    vast = sdk(fake)
    ids = [rent_one(vast, query="num_gpus=1") for _ in range(30)]
    fake.set_limits(enabled=True)
    market = Marketplace(fake.api_key, fake.url, paced=True)

    try:
        listed = market.list_instances()
        listed_again = market.list_instances()
        refused = fake.ledger()["rate_limited"]
    finally:
        fake.set_limits(enabled=False)
        for instance_id in ids:
            vast.destroy_instance(id=instance_id)

    assert sorted(row.id for row in listed) == sorted(ids)
    assert sorted(row.id for row in listed_again) == sorted(ids)
    assert refused == {}, refused
