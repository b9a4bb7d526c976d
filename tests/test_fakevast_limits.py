"""The fake lives by Vast.ai's rate limits, daily search quota and accounting (vast-api.md
§10: bandwidth billed per byte, RAM as a share of the machine), driven over plain HTTP, the
unmodified SDK and real SSH.

Most tests freeze the limits' own clock and move it forward (``POST /_fake/limits``), so that
a boundary is reached exactly, however busy the machine is; one test checks the same limits in
real time, asserting only lower bounds on elapsed time.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paramiko
import pytest
import requests
from vastai import VastAI

from tests.fakevast.catalog import DEFAULT_OFFERS, Catalog
from tests.fakevast.clients import DEFAULT_IMAGE, public_key, run, sdk, ssh_login, wait_status
from tests.fakevast.harness import FakeVast

CREATE_BODY = {"image": DEFAULT_IMAGE, "disk": 10, "runtype": "ssh"}
OFFER = 9210001  # min_bid 0.202: a create with price 0.5 is an interruptible instance
OTHER_OFFERS = (9210002, 9210003)
SEARCH = "POST /api/v0/bundles/"
CREATE = "PUT /api/v0/asks/{id}/"
NO_ONE = 1  # an instance id that never exists: destroy answers 404 once admitted
INET_UP_COST, INET_DOWN_COST = 20.0, 10.0  # $/GB on OFFER in the second fake: 2 MB out = $0.04
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeVastLimitsTestKeyOnlyForTheFakeMarket"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def call(
    fake: FakeVast,
    method: str,
    path: str,
    body: Any = None,
    key: str | None = None,
    source: str = "127.0.0.1",
    in_query: bool = False,
) -> Answer:
    """One request with the user's key (or `key`) as a Bearer token, or as ``?api_key=``,
    sent from the client address `source` (any 127.x address reaches the fake)."""
    key = key or fake.api_key
    url = urlsplit(fake.url)
    headers = {"Content-Type": "application/json"}
    if in_query:
        path += ("&" if "?" in path else "?") + f"api_key={key}"
    else:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body)
    connection = http.client.HTTPConnection(
        url.hostname, url.port, timeout=30, source_address=(source, 0)
    )
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read().decode())
    finally:
        connection.close()


def assert_refused(answer: Answer, threshold: str) -> None:
    """Vast.ai's refusal, exactly: plain text naming the interval, no Retry-After."""
    assert answer.status == 429, answer
    assert answer.text == f"API requests too frequent: endpoint threshold={threshold}"
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert "Retry-After" not in answer.headers


def assert_admitted(answer: Answer) -> None:
    """The call reached its handler (its own answer may still be an error, e.g. a 404)."""
    assert answer.status != 429, answer


def rent(fake: FakeVast, offer: int = OFFER, price: float | None = 0.5) -> int:
    answer = call(fake, "PUT", f"/api/v0/asks/{offer}/", {**CREATE_BODY, "price": price})
    assert answer.status == 200, answer
    return answer.json()["new_contract"]


def rate_limited(fake: FakeVast) -> dict[str, int]:
    return fake.ledger()["rate_limited"]


def advance(fake: FakeVast, seconds: float) -> None:
    fake.set_limits(advance_seconds=seconds)


@pytest.fixture(scope="module")
def limited() -> Iterator[FakeVast]:
    """One fake for the module, started with the defaults: the limits are on. Its instances
    never boot (no container needed to count calls)."""
    fake = FakeVast(boot_seconds=600)
    try:
        yield fake
        assert fake.alive_instances() == []
    finally:
        fake.stop()


@pytest.fixture
def fake(limited: FakeVast) -> Iterator[FakeVast]:
    """The module's fake with fresh budgets and a frozen limits clock; every instance a test
    rented is destroyed afterwards."""
    limited.set_limits(reset=True, freeze=True)
    yield limited
    alive = [row["id"] for row in limited.alive_instances()]
    limited.set_limits(reset=True)
    if alive:
        call(limited, "DELETE", "/api/v0/instances/", {"instance_ids": alive})


# -- one call per interval, per endpoint -------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # {id}: an instance the test rents
    body: dict[str, Any] | None
    threshold: str


ENDPOINTS = {
    "list": Endpoint("GET", "/api/v1/instances/?limit=25", None, "1.0"),
    "list v0": Endpoint("GET", "/api/v0/instances/?owner=me", None, "1.0"),
    "show": Endpoint("GET", "/api/v0/instances/{id}/?owner=me", None, "2.0"),
    "destroy": Endpoint("DELETE", f"/api/v0/instances/{NO_ONE}/", {}, "3.0"),
    "label": Endpoint("PUT", "/api/v0/instances/{id}/", {"label": "x"}, "1.0"),
    "stop": Endpoint("PUT", "/api/v0/instances/{id}/", {"state": "stopped"}, "1.0"),
    "reboot": Endpoint("PUT", "/api/v0/instances/reboot/{id}/", {}, "1.0"),
    "change bid": Endpoint(
        "PUT", "/api/v0/instances/bid_price/{id}/", {"client_id": "me", "price": 0.6}, "5.5"
    ),
    "logs": Endpoint("PUT", "/api/v0/instances/request_logs/{id}/", {"tail": "10"}, "1.0"),
    "attach": Endpoint("POST", "/api/v0/instances/{id}/ssh/", {"ssh_key": KEY}, "1.0"),
    "add key": Endpoint("POST", "/api/v0/ssh/", {"ssh_key": KEY}, "1.0"),
    "list keys": Endpoint("GET", "/api/v0/ssh/", None, "1.0"),
    "delete key": Endpoint("DELETE", "/api/v0/ssh/999/", {}, "1.0"),
    "user": Endpoint("GET", "/api/v0/users/current", None, "1.0"),
}


@pytest.mark.parametrize("endpoint", ENDPOINTS.values(), ids=ENDPOINTS.keys())
def test_each_endpoint_refuses_a_call_within_its_interval(
    fake: FakeVast, endpoint: Endpoint
) -> None:
    """Admitted, refused at once and just before the interval ends (the refusal does not
    extend the wait), admitted just after it."""
    path = endpoint.path.replace("{id}", str(rent(fake)))
    interval = float(endpoint.threshold)
    before = sum(rate_limited(fake).values())

    assert_admitted(call(fake, endpoint.method, path, endpoint.body))
    assert_refused(call(fake, endpoint.method, path, endpoint.body), endpoint.threshold)
    advance(fake, interval - 0.05)
    assert_refused(call(fake, endpoint.method, path, endpoint.body), endpoint.threshold)
    advance(fake, 0.1)
    assert_admitted(call(fake, endpoint.method, path, endpoint.body))

    assert sum(rate_limited(fake).values()) == before + 2


def test_a_refused_call_takes_no_effect(fake: FakeVast) -> None:
    instance_id = rent(fake)
    label = f"/api/v0/instances/{instance_id}/"
    assert call(fake, "PUT", label, {"label": "first"}).status == 200
    assert_refused(call(fake, "PUT", label, {"label": "second"}), "1.0")
    bid = f"/api/v0/instances/bid_price/{instance_id}/"
    assert call(fake, "PUT", bid, {"price": 0.7}).status == 200
    assert_refused(call(fake, "PUT", bid, {"price": 0.9}), "5.5")
    assert call(fake, "DELETE", f"/api/v0/instances/{NO_ONE}/", {}).status == 404
    assert_refused(call(fake, "DELETE", f"/api/v0/instances/{instance_id}/", {}), "3.0")
    assert_refused(call(fake, "PUT", f"/api/v0/asks/{OTHER_OFFERS[0]}/", CREATE_BODY), "4.5")

    [row] = fake.alive_instances()
    assert (row["id"], row["label"], row["bid_price"]) == (instance_id, "first", 0.7)
    assert row["dph_total"] == pytest.approx(0.7 + 0.1 * 10 / 720)


# -- search: 10 per sliding minute --------------------------------------------------------------


def test_search_allows_ten_in_any_sixty_seconds(fake: FakeVast) -> None:
    def search() -> Answer:
        return call(fake, "POST", "/api/v0/bundles/", {"limit": 1})

    before = rate_limited(fake).get(SEARCH, 0)
    assert all(search().status == 200 for _ in range(5))
    advance(fake, 30)
    assert all(search().status == 200 for _ in range(5))
    assert_refused(search(), "6.0")
    advance(fake, 29.9)  # the first five are 59.9 s old: still in the window
    assert_refused(search(), "6.0")
    advance(fake, 0.2)  # they have left it; the second five have not
    assert all(search().status == 200 for _ in range(5))
    assert_refused(search(), "6.0")
    assert rate_limited(fake)[SEARCH] == before + 3


# -- create: one per 4.5 s, and a too-early create blocks creates for 12 s ----------------------


def test_a_too_early_create_blocks_creates_for_twelve_seconds(fake: FakeVast) -> None:
    def create(offer: int) -> Answer:
        return call(fake, "PUT", f"/api/v0/asks/{offer}/", CREATE_BODY)

    first, second = OTHER_OFFERS
    assert create(first).status == 200
    assert_refused(create(second), "4.5")  # blocks creates until +12
    advance(fake, 4.6)  # the interval alone would allow it now
    assert_refused(create(second), "4.5")  # refused again: blocked until 4.6 + 12
    advance(fake, 7.5)  # 12.1 s after the first refusal, 7.5 s after the last
    assert_refused(create(second), "4.5")  # every refused create restarts the penalty
    advance(fake, 12.1)
    assert create(second).status == 200
    assert len(fake.alive_instances()) == 2


def test_the_sdk_create_retries_into_the_penalty(fake: FakeVast) -> None:
    """The SDK retries a 429 twice within half a second: all three are refused, counted."""
    vast = sdk(fake)
    rent(fake)
    before = rate_limited(fake).get(CREATE, 0)
    with pytest.raises(requests.HTTPError, match="429"):
        vast.create_instance(id=OTHER_OFFERS[0], image=DEFAULT_IMAGE, disk=10, runtype="ssh")
    assert rate_limited(fake)[CREATE] == before + 3
    assert len(fake.alive_instances()) == 1


# -- identities ---------------------------------------------------------------------------------


def test_each_client_address_has_its_own_allowance(fake: FakeVast) -> None:
    path = f"/api/v0/instances/{rent(fake)}/"
    assert call(fake, "GET", path).status == 200
    assert_refused(call(fake, "GET", path), "2.0")
    assert call(fake, "GET", path, source="127.0.0.2").status == 200
    assert_refused(call(fake, "GET", path, source="127.0.0.2"), "2.0")


def test_the_key_in_the_query_is_the_same_identity_as_the_bearer(fake: FakeVast) -> None:
    """SDK <= 1.5.0 sends the key both ways; either way it is one allowance."""
    assert call(fake, "GET", "/api/v0/users/current").status == 200
    assert_refused(call(fake, "GET", "/api/v0/users/current", in_query=True), "1.0")


def test_a_refused_call_uses_up_no_http_fault(fake: FakeVast) -> None:
    endpoint = "GET /api/v0/users/current/"
    assert call(fake, "GET", "/api/v0/users/current").status == 200
    fake.set_faults({"http": [{"status": 503, "count": 1, "endpoint": endpoint}]})
    try:
        assert_refused(call(fake, "GET", "/api/v0/users/current"), "1.0")
        assert len(fake.faults()["http"]) == 1
        advance(fake, 1.1)
        assert call(fake, "GET", "/api/v0/users/current").status == 503
    finally:
        fake.clear_faults()


# -- the daily search quota ---------------------------------------------------------------------


def test_the_search_quota_refuses_until_utc_midnight(fake: FakeVast) -> None:
    vast = sdk(fake)
    fake.set_limits(search_quota=3)
    try:
        assert all(call(fake, "POST", "/api/v0/bundles/", {}).status == 200 for _ in range(3))
        refused = call(fake, "POST", "/api/v0/bundles/", {})
        assert refused.status == 429 and refused.json() == {"error": "search_quota_exceeded"}
        assert "Retry-After" not in refused.headers
        reset = int(refused.headers["X-RateLimit-Reset"])
        wall = fake.limits()["wall_clock"]
        assert reset % 86400 == 0 and wall < reset <= wall + 86400  # the next UTC midnight

        searches = len([r for r in fake.requests() if r["endpoint"] == SEARCH])
        with pytest.raises(requests.HTTPError, match="429"):
            vast.search_offers(query="num_gpus=1")
        assert len([r for r in fake.requests() if r["endpoint"] == SEARCH]) == searches + 1
        other = call(fake, "POST", "/api/v0/bundles/", {}, source="127.0.0.2")
        assert other.json() == {"error": "search_quota_exceeded"}  # per key, any address
        assert fake.ledger()["quota_exceeded"][SEARCH] >= 3

        advance(fake, reset - wall + 1)
        assert call(fake, "POST", "/api/v0/bundles/", {}).status == 200
        assert fake.limits()["searches_today"] == {fake.api_key: 1}
    finally:
        fake.set_limits(search_quota=None)


# -- batch create and batch destroy -------------------------------------------------------------


def test_batch_create_and_destroy_through_the_sdk(fake: FakeVast) -> None:
    """A batch is charged one call per id it names: a create on three offers holds creates
    for 13.5 s, a destroy of four ids holds destroys for 12 s."""
    vast = sdk(fake)
    created = vast.create_instances(
        ids=[*OTHER_OFFERS, 123], image=DEFAULT_IMAGE, disk=10, runtype="ssh", label="batch"
    )
    ids = created["new_contracts"]
    assert created["success"] is False and len(ids) == 2
    assert [r["ask_id"] for r in created["results"]] == [*OTHER_OFFERS, 123]
    assert created["results"][2]["error"] == "invalid_args"  # no such offer
    assert {row["label"] for row in fake.alive_instances()} == {"batch"}

    advance(fake, 9.0)  # a single create would have been free again at 4.5
    assert_refused(call(fake, "PUT", f"/api/v0/asks/{OFFER}/", CREATE_BODY), "4.5")
    advance(fake, 12.1)
    ids.append(rent(fake))

    destroyed = vast.destroy_instances(ids=[*ids, NO_ONE])
    assert destroyed["destroyed"] == ids and destroyed["not_found"] == [NO_ONE]
    assert destroyed["success"] is False
    assert fake.alive_instances() == []
    advance(fake, 8.9)  # four ids: destroys are held for 12 s
    assert_refused(call(fake, "DELETE", f"/api/v0/instances/{NO_ONE}/", {}), "3.0")
    advance(fake, 3.2)
    assert call(fake, "DELETE", f"/api/v0/instances/{NO_ONE}/", {}).status == 404


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v0/asks/bulk/", {**CREATE_BODY, "ids": []}),
        ("POST", "/api/v0/asks/bulk/", {**CREATE_BODY, "ids": ["9210001"]}),
        ("DELETE", "/api/v0/instances/", {"instance_ids": 5}),
    ],
)
def test_a_malformed_batch_is_refused_whole(
    fake: FakeVast, method: str, path: str, body: dict
) -> None:
    answer = call(fake, method, path, body)
    assert answer.status == 400 and answer.json()["error"] == "invalid_args"
    assert fake.alive_instances() == []


# -- real time ----------------------------------------------------------------------------------


def test_the_limits_hold_in_real_time(fake: FakeVast) -> None:
    """Without the frozen clock; only lower bounds on time are relied on."""
    fake.set_limits(freeze=False)
    path = f"/api/v0/instances/{rent(fake)}/"
    assert call(fake, "GET", path).status == 200
    assert_refused(call(fake, "GET", path), "2.0")
    time.sleep(2.2)
    assert call(fake, "GET", path).status == 200
    time.sleep(4.5 - 2.2 + 0.3)  # 4.5 s since the create, without a refused one between
    rent(fake, OTHER_OFFERS[0], price=None)


# -- the switches, the control plane and the instance's own key ---------------------------------


@pytest.fixture(scope="module")
def unlimited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeVast]:
    """A second fake: no rate limits, a quota of two searches, instant boots, and OFFER's
    bandwidth at prices that make a few megabytes cost cents."""
    entries = json.loads(DEFAULT_OFFERS.read_text())
    for entry in entries:
        if entry["id"] == OFFER:
            entry.update(inet_up_cost=INET_UP_COST, inet_down_cost=INET_DOWN_COST)
    offers = tmp_path_factory.mktemp("offers") / "offers.json"
    offers.write_text(json.dumps(entries))
    fake = FakeVast(boot_seconds=0, rate_limits=False, search_quota=2, offers=offers)
    try:
        yield fake
        assert fake.alive_instances() == []
    finally:
        fake.stop()


def test_the_switch_turns_the_limits_off_but_not_the_quota(unlimited: FakeVast) -> None:
    vast = sdk(unlimited)
    assert unlimited.limits()["enabled"] is False
    unlimited.set_faults({"boot_seconds": 600})  # counting calls needs no container
    assert all(call(unlimited, "GET", "/api/v0/users/current").status == 200 for _ in range(5))
    ids = [
        vast.create_instance(id=offer, image=DEFAULT_IMAGE, disk=10, runtype="ssh")["new_contract"]
        for offer in (OFFER, *OTHER_OFFERS)
    ]
    assert all(vast.show_instance(i)["id"] == i for i in ids for _ in range(2))
    vast.destroy_instances(ids=ids[:2])
    vast.destroy_instance(ids[2])
    assert [call(unlimited, "POST", "/api/v0/bundles/", {}).status for _ in range(3)] == [
        200,
        200,
        429,
    ]
    unlimited.clear_faults()
    ledger = unlimited.ledger()
    assert ledger["rate_limited"] == {}
    assert ledger["quota_exceeded"] == {SEARCH: 1}


def test_limits_control_rejects_a_bad_document(unlimited: FakeVast) -> None:
    for bad in ({"enabled": "yes"}, {"search_quota": -1}, {"advance_seconds": -1}, {"x": 1}):
        answer = call(unlimited, "POST", "/_fake/limits", bad)
        assert answer.status == 400 and answer.json()["error"] == "invalid_limits", bad
    assert unlimited.limits()["enabled"] is False


def test_an_instances_own_key_is_its_own_identity(unlimited: FakeVast) -> None:
    """The key is read back from the instance's log (its main process echoes it)."""
    vast = sdk(unlimited)
    script = 'echo "key=$CONTAINER_API_KEY"; exec sleep 600'
    created = vast.create_instance(
        id=OFFER,
        image=DEFAULT_IMAGE,
        disk=10,
        runtype="args",
        onstart_cmd="/bin/sh",
        args=["-c", script],
    )
    instance_id = created["new_contract"]
    try:
        key = _container_key(unlimited, vast, instance_id)
        unlimited.set_limits(enabled=True, reset=True, freeze=True)
        path = f"/api/v0/instances/{instance_id}/"
        assert call(unlimited, "GET", path).status == 200
        assert_refused(call(unlimited, "GET", path), "2.0")
        assert call(unlimited, "GET", path, key=key).status == 200
        assert_refused(call(unlimited, "GET", path, key=key), "2.0")
    finally:
        unlimited.set_limits(enabled=False, freeze=False, reset=True)
        vast.destroy_instance(instance_id)


def _container_key(fake: FakeVast, vast: VastAI, instance_id: int) -> str:
    def logged_key() -> str | None:
        text = vast.logs(instance_id, tail="10")
        found = re.search(r"key=([0-9a-f]{64})", text if isinstance(text, str) else "")
        return found.group(1) if found else None

    fake.wait_for(lambda: fake.alive_instances()[0]["status"] == "running", timeout=120)
    fake.wait_for(logged_key, timeout=30, interval=0.5)
    key = logged_key()
    assert key is not None
    return key


# -- accounting: bandwidth and machine shares ---------------------------------------------------


def test_bytes_over_ssh_are_billed_at_the_offers_prices(
    unlimited: FakeVast, ssh_key: paramiko.PKey
) -> None:
    """2 MB out of the instance at $20/GB: at least $0.04, in its ledger row and the balance."""
    vast = sdk(unlimited)
    size = 2_000_000
    created = vast.create_instance(id=OFFER, image=DEFAULT_IMAGE, disk=10, runtype="ssh_proxy")
    instance_id = created["new_contract"]
    try:
        vast.attach_ssh(instance_id, public_key(ssh_key))
        row = wait_status(vast, instance_id, "running", timeout=120)
        client = ssh_login(row["ssh_host"], row["ssh_port"], ssh_key)
        try:
            assert len(run(client, f"head -c {size} /dev/zero | tr '\\0' x")) == size
        finally:
            client.close()
    finally:
        vast.destroy_instance(instance_id)

    ledger = unlimited.ledger()
    [row] = [r for r in ledger["instances"] if r["id"] == instance_id]
    moved = row["ssh_bytes"]
    assert moved["down"] > size and moved["up"] > 0
    expected = (moved["up"] * INET_DOWN_COST + moved["down"] * INET_UP_COST) / 1e9
    assert row["bandwidth_cost"] == pytest.approx(expected) and expected >= 0.04
    assert ledger["ssh_bytes"] == {
        way: sum(r["ssh_bytes"][way] for r in ledger["instances"]) for way in ("up", "down")
    }
    spent = sum(
        r["dph_total"] * (r["ended_at"] - r["created_at"]) / 3600 + r["bandwidth_cost"]
        for r in ledger["instances"]
    )
    assert vast.show_user()["balance"] == pytest.approx(100 - spent, abs=2e-6)


def test_an_instance_gets_its_share_of_the_machines_ram(unlimited: FakeVast) -> None:
    """OFFER is 20 of a 32-core machine's cores: gpu_frac 0.625, and that much of its RAM."""
    vast = sdk(unlimited)
    [offer] = [o for o in vast.search_offers(query="num_gpus=1", limit=100) if o["id"] == OFFER]
    assert offer["gpu_frac"] == offer["cpu_cores_effective"] / offer["cpu_cores"] == 0.625
    unlimited.set_faults({"boot_seconds": 600})
    instance_id = vast.create_instance(id=OFFER, image=DEFAULT_IMAGE, disk=10)["new_contract"]
    vast.destroy_instance(instance_id)
    unlimited.clear_faults()
    [row] = [r for r in unlimited.ledger()["instances"] if r["id"] == instance_id]
    assert (row["gpu_frac"], row["cpu_cores"], row["cpu_cores_effective"]) == (0.625, 32, 20.0)
    assert row["ram_share_mb"] == pytest.approx(offer["cpu_ram"] * 0.625)


def test_the_catalogue_derives_gpu_frac_unless_given(tmp_path: Path) -> None:
    offers = tmp_path / "offers.json"
    entries = [
        {"id": 1, "cpu_cores": 128, "cpu_cores_effective": 32.0},  # a quarter
        {"id": 2, "gpu_frac": 0.5},  # given: kept
        {"id": 3, "cpu_cores": None},  # unknown, as on some real offers: the whole machine
    ]
    offers.write_text(json.dumps(entries))
    catalogue = Catalog.load(offers).offers
    assert [catalogue[i]["gpu_frac"] for i in (1, 2, 3)] == [0.25, 0.5, 1.0]
