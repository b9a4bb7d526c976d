"""Every fault the fake can inject, shown through the unmodified SDK and real SSH sessions."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import paramiko
import pytest
import requests
from vastai import VastAI

from tests.fakevast.clients import public_key, rent, run, sdk, ssh_login, wait_status
from tests.fakevast.faults import BOOT_FAILURES
from tests.fakevast.harness import FakeVast


@pytest.fixture
def vast(fakevast: FakeVast) -> VastAI:
    return sdk(fakevast)


def calls(fake: FakeVast, key: str) -> int:
    return fake.ledger()["api_calls"].get(key, 0)


def timed(action: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = action()
    return result, time.monotonic() - start


@pytest.fixture
def session(
    fakevast: FakeVast, vast: VastAI, ssh_key: paramiko.PKey
) -> Iterator[tuple[int, dict, paramiko.SSHClient]]:
    """A running ssh instance with a live root session through its proxy relay."""
    instance_id = rent(vast)
    vast.attach_ssh(instance_id, public_key(ssh_key))
    row = wait_status(vast, instance_id, "running")
    client = ssh_login(row["ssh_host"], row["ssh_port"], ssh_key)
    yield instance_id, row, client
    client.close()
    vast.destroy_instance(instance_id)


def assert_dead(client: paramiko.SSHClient, within: float = 5.0) -> None:
    """The connection dies within ``within`` seconds: the fault's status may show a moment
    before its cuts land (another thread applies them)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            run(client, "true", timeout=5)
        except (paramiko.SSHException, EOFError, OSError):
            return
        time.sleep(0.1)
    pytest.fail(f"the SSH connection still works {within:g} s after the fault")


# -- HTTP faults -------------------------------------------------------------------------------


def test_429_burst_is_retried_by_the_sdk(fakevast: FakeVast, vast: VastAI) -> None:
    fakevast.set_faults(
        {"http": [{"status": 429, "count": 2, "endpoint": "POST /api/v0/bundles/"}]}
    )
    offers, elapsed = timed(lambda: vast.search_offers(query="num_gpus=1"))
    assert offers and calls(fakevast, "POST /api/v0/bundles/") == 3
    assert elapsed > 0.3  # SDK backoff 0.15 s, then 0.225 s

    fakevast.set_faults({"http": [{"status": 429, "count": 3}]})  # any endpoint
    with pytest.raises(requests.HTTPError) as exhausted:
        vast.show_user()
    assert exhausted.value.response.status_code == 429
    assert exhausted.value.response.json() == {
        "detail": "API requests too frequent endpoint threshold=3.0"
    }
    assert calls(fakevast, "GET /api/v0/users/current/") == 3
    assert fakevast.ledger()["api_calls"]["POST /api/v0/bundles/"] == 3  # unaffected


def test_retry_after_is_sent_and_honoured(fakevast: FakeVast, vast: VastAI) -> None:
    fakevast.set_faults({"http": [{"status": 429, "count": 1, "retry_after": 1.5}]})
    user, elapsed = timed(vast.show_user)
    assert user["id"] and elapsed >= 1.5
    fakevast.set_faults({"http": [{"status": 429, "retry_after": 2}]})
    request = urllib.request.Request(
        fakevast.url + "/api/v0/users/current", headers={"Authorization": "Bearer fake-key"}
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=10)
    assert answer.value.code == 429 and answer.value.headers["Retry-After"] == "2"


def test_search_quota_429_is_not_retried(fakevast: FakeVast, vast: VastAI) -> None:
    rule = {"status": 429, "body": {"error": "search_quota_exceeded"}, "count": 5}
    fakevast.set_faults({"http": [rule]})
    with pytest.raises(requests.HTTPError):
        vast.search_offers(query="num_gpus=1")
    assert calls(fakevast, "POST /api/v0/bundles/") == 1


@pytest.mark.parametrize(("status", "retried"), [(500, False), (502, True), (503, True)])
def test_5xx(fakevast: FakeVast, vast: VastAI, status: int, retried: bool) -> None:
    fakevast.set_faults({"http": [{"status": status, "endpoint": "GET /api/v1/instances/"}]})
    if retried:
        assert vast.show_instances() == []
    else:
        with pytest.raises(requests.HTTPError) as failed:
            vast.show_instances()
        assert failed.value.response.status_code == status
        assert failed.value.response.json()["error"] == "server_error"
    assert calls(fakevast, "GET /api/v1/instances/") == (2 if retried else 1)


def test_destroy_answers_5xx_once(fakevast: FakeVast, vast: VastAI) -> None:
    instance_id = rent(vast)
    endpoint = f"DELETE /api/v0/instances/{instance_id}"  # a concrete path works as well
    fakevast.set_faults({"http": [{"status": 500, "endpoint": endpoint}]})
    with pytest.raises(requests.HTTPError) as failed:
        vast.destroy_instance(instance_id)
    assert failed.value.response.status_code == 500
    assert [row["id"] for row in fakevast.alive_instances()] == [instance_id]
    assert vast.destroy_instance(instance_id)["success"] is True


def test_slow_answers(fakevast: FakeVast, vast: VastAI) -> None:
    rule = {"latency": 1.0, "count": None, "endpoint": "GET /api/v0/users/current/"}
    fakevast.set_faults({"http": [rule]})
    _, slow = timed(vast.show_user)
    _, fast = timed(lambda: vast.search_offers(query="num_gpus=1"))
    _, again = timed(vast.show_user)
    assert slow >= 1.0 and again >= 1.0 and fast < 0.5
    fakevast.clear_faults()
    _, cleared = timed(vast.show_user)
    assert cleared < 0.5


# -- boot faults -------------------------------------------------------------------------------


@pytest.mark.parametrize("message", BOOT_FAILURES, ids=lambda m: m.split(":")[-1].strip()[:24])
def test_boot_failure_status_msg(fakevast: FakeVast, vast: VastAI, message: str) -> None:
    fakevast.set_faults({"next_creates": {"count": 1, "boot_failure": message}})
    instance_id = rent(vast)
    expected = "created" if "OCI runtime create failed" in message else "loading"
    row = wait_status(vast, instance_id, expected, timeout=5)
    fakevast.wait_for(lambda: vast.show_instance(instance_id)["status_msg"] == message, 5)
    time.sleep(0.5)  # well past --boot-seconds 0: it never runs
    row = vast.show_instance(instance_id)
    assert (row["actual_status"], row["status_msg"], row["ssh_port"]) == (expected, message, None)
    vast.destroy_instance(instance_id)


def test_boot_failure_per_offer_and_for_next_creates(fakevast: FakeVast, vast: VastAI) -> None:
    offer_id = vast.search_offers(query="gpu_name=RTX_3090", order="dph_total")[0]["id"]
    fakevast.set_faults({"offers": {str(offer_id): {"boot_failure": "manifest unknown"}}})
    for _ in range(2):  # every create on that offer
        instance_id = vast.create_instance(id=offer_id, image="vastai/x", disk=10)["new_contract"]
        row = wait_status(vast, instance_id, "loading")
        assert row["status_msg"] == "manifest unknown"
        vast.destroy_instance(instance_id)

    fakevast.set_faults({"next_creates": {"count": 2, "boot_failure": "no space left on device"}})
    failing = [rent(vast), rent(vast)]
    healthy = rent(vast)
    for instance_id in failing:
        assert wait_status(vast, instance_id, "loading")["status_msg"] == "no space left on device"
    wait_status(vast, healthy, "running")
    assert fakevast.ledger()["instances"][-1]["status"] == "running"
    for instance_id in [*failing, healthy]:
        vast.destroy_instance(instance_id)


def test_stuck_in_loading_until_cleared(fakevast: FakeVast, vast: VastAI) -> None:
    fakevast.set_faults({"next_creates": {"stuck_loading": True}})
    instance_id = rent(vast)
    wait_status(vast, instance_id, "loading")
    time.sleep(1.0)
    row = vast.show_instance(instance_id)
    assert row["actual_status"] == "loading" and row["status_msg"].startswith("Pulling image")
    fakevast.clear_faults()
    wait_status(vast, instance_id, "running")
    vast.destroy_instance(instance_id)


def test_boot_seconds_at_run_time(fakevast: FakeVast, vast: VastAI) -> None:
    fakevast.set_faults({"boot_seconds": 1.5})
    instance_id = rent(vast)
    time.sleep(1.0)
    assert vast.show_instance(instance_id)["actual_status"] == "loading"
    row = wait_status(vast, instance_id, "running", timeout=5)
    assert fakevast.ledger()["instances"][0]["running_at"] - row["start_date"] >= 1.5
    fakevast.set_faults({"boot_seconds": None})  # back to --boot-seconds
    assert fakevast.ledger()  # still serving
    vast.destroy_instance(instance_id)


# -- faults of running instances ---------------------------------------------------------------


def test_offline_mid_session(
    fakevast: FakeVast, vast: VastAI, ssh_key: paramiko.PKey, session: Any
) -> None:
    instance_id, row, client = session
    assert run(client, "echo up") == "up\n"
    fakevast.set_faults({"instances": {str(instance_id): {"offline": True}}})
    assert_dead(client)
    assert vast.show_instance(instance_id)["actual_status"] == "offline"
    with pytest.raises((paramiko.SSHException, OSError)):
        ssh_login(row["ssh_host"], row["ssh_port"], ssh_key, timeout=3).close()
    time.sleep(0.3)
    assert vast.show_instance(instance_id)["actual_status"] == "offline"  # never comes back
    assert fakevast.ledger()["instances"][0]["status"] == "offline"


def test_offline_after_a_delay(fakevast: FakeVast, vast: VastAI, session: Any) -> None:
    instance_id, _, client = session
    fakevast.set_faults({"instances": {str(instance_id): {"offline": {"after_seconds": 1.0}}}})
    time.sleep(0.5)
    assert run(client, "echo still-up") == "still-up\n"
    wait_status(vast, instance_id, "offline", timeout=3)
    assert_dead(client)


def test_stopped_by_outbid(fakevast: FakeVast, vast: VastAI, session: Any) -> None:
    instance_id, _, client = session
    fakevast.set_faults({"instances": {str(instance_id): {"stopped": True}}})
    row = vast.show_instance(instance_id)
    states = [row[k] for k in ("cur_state", "intended_status", "next_state", "actual_status")]
    assert states == ["stopped"] * 4
    assert_dead(client)


def test_cut_connections_is_one_shot(
    fakevast: FakeVast, vast: VastAI, ssh_key: paramiko.PKey, session: Any
) -> None:
    instance_id, row, client = session
    fakevast.set_faults({"instances": {str(instance_id): {"cut_connections": True}}})
    assert_dead(client)
    assert vast.show_instance(instance_id)["actual_status"] == "running"
    fresh = ssh_login(row["ssh_host"], row["ssh_port"], ssh_key)
    assert run(fresh, "echo back") == "back\n"
    fakevast.set_faults({"cut_connections": True})  # every instance's connections, once
    assert_dead(fresh)
    ssh_login(row["ssh_host"], row["ssh_port"], ssh_key).close()


def _upload_seconds(client: paramiko.SSHClient, size: int) -> float:
    sftp = client.open_sftp()
    try:
        _, elapsed = timed(lambda: sftp.putfo(io.BytesIO(b"x" * size), "/root/blob"))
    finally:
        sftp.close()
    return elapsed


def test_bandwidth_cap_slows_transfers(fakevast: FakeVast, session: Any) -> None:
    instance_id, _, client = session
    fakevast.set_faults({"instances": {str(instance_id): {"bandwidth": 100_000}}})
    capped = _upload_seconds(client, 200_000)
    assert capped >= 1.5  # the live session is slowed too
    fakevast.clear_faults()
    assert _upload_seconds(client, 200_000) < capped / 2  # compared within the run: no limit
    fakevast.set_faults({"bandwidth": 100_000})  # every instance
    assert _upload_seconds(client, 100_000) >= 0.8
    fakevast.clear_faults()


def test_price_rise(fakevast: FakeVast, vast: VastAI) -> None:
    instance_id = rent(vast)
    before = vast.show_instance(instance_id)["dph_total"]
    fakevast.set_faults({"instances": {str(instance_id): {"price_rise": {"dph_total": 2.5}}}})
    assert before < 2.5 and vast.show_instance(instance_id)["dph_total"] == 2.5
    assert fakevast.ledger()["instances"][0]["dph_total"] == 2.5

    offer_id = vast.search_offers(query="gpu_name=RTX_3090", order="dph_total")[0]["id"]
    rise = {"price_rise": {"dph_total": 3.0, "after_seconds": 1.0}}
    fakevast.set_faults({"offers": {str(offer_id): rise}})
    later = vast.create_instance(id=offer_id, image="vastai/x", disk=10)["new_contract"]
    assert vast.show_instance(later)["dph_total"] < 1
    fakevast.wait_for(lambda: vast.show_instance(later)["dph_total"] == 3.0, timeout=3)
    assert fakevast.ledger()["instances"][1]["dph_total"] == 3.0
    for instance in (instance_id, later):
        vast.destroy_instance(instance)


def test_create_fails_after_the_offer_was_shown(fakevast: FakeVast, vast: VastAI) -> None:
    offer_id = vast.search_offers(query="gpu_name=RTX_4090", order="dph_total")[0]["id"]
    fakevast.set_faults({"offers": {str(offer_id): {"gone": True}}})
    with pytest.raises(requests.HTTPError) as gone:
        vast.create_instance(id=offer_id, image="vastai/x", disk=10)
    assert gone.value.response.status_code == 410
    assert gone.value.response.json()["error"] == "no_such_ask"
    assert offer_id not in {o["id"] for o in vast.search_offers(query="gpu_name=RTX_4090")}

    fakevast.set_faults({"next_creates": {"gone": True}})
    with pytest.raises(requests.HTTPError) as next_gone:
        rent(vast)
    assert next_gone.value.response.status_code == 410
    instance_id = rent(vast)  # only the next one
    vast.destroy_instance(instance_id)


def test_logs_upload_lag(fakevast: FakeVast, vast: VastAI) -> None:
    fakevast.set_faults({"logs_not_ready": 2})
    instance_id = rent(vast, runtype="args", onstart_cmd="/bin/echo", args=["lagged"])
    wait_status(vast, instance_id, "exited")
    logs, elapsed = timed(lambda: vast.logs(instance_id))
    assert logs == "lagged\n" and elapsed >= 0.9  # three 0.3 s polls: 404, 404, 200
    vast.destroy_instance(instance_id)


# -- the control plane itself ------------------------------------------------------------------


def test_fault_document_merge_validation_and_clear(fakevast: FakeVast, vast: VastAI) -> None:
    fakevast.set_faults(
        {"http": [{"status": 503, "count": 2}], "offers": {"9210001": {"gone": True}}}
    )
    fakevast.set_faults(
        {
            "http": [{"latency": 0.1}],
            "offers": {"9210001": {"stuck_loading": True}},
            "bandwidth": 5e4,
        }
    )
    current = fakevast.faults()
    assert [rule["status"] for rule in current["http"]] == [503, None]  # rules append
    assert current["offers"]["9210001"]["gone"] is True  # offers merge key by key
    assert current["offers"]["9210001"]["stuck_loading"] is True
    assert current["bandwidth"] == 5e4 and current["boot_seconds"] == 0.0

    for bad in (
        {"no_such_key": 1},
        {"http": [{"status": 404}]},
        {"http": [{"count": 2}]},
        {"instances": {"1": {"offline": True}}},  # no such instance
        {"next_creates": {"boot_failure": 3}},
        {"offers": {"9210001": {"price_rise": {"after_seconds": 1}}}},
    ):
        with pytest.raises(urllib.error.HTTPError) as rejected:
            fakevast.set_faults(bad)
        assert rejected.value.code == 400
    assert fakevast.faults() == current  # nothing half-applied

    fakevast.clear_faults()
    cleared = fakevast.faults()
    assert cleared["http"] == [] and cleared["offers"] == {} and cleared["bandwidth"] is None
    assert vast.show_user()["id"]
    assert "GET /_fake/faults/" not in fakevast.ledger()["api_calls"]


# -- answers lost after the effect, random faults, the request log ----------------------------


def test_create_and_destroy_answers_lost_after_the_effect(fakevast: FakeVast, vast: VastAI) -> None:
    once = sdk(fakevast, retry=1)  # no SDK retry: the 503 reaches the caller
    lost = {"status": 503, "after_effect": True, "endpoint": "PUT /api/v0/asks/{id}/"}
    fakevast.set_faults({"http": [lost]})
    with pytest.raises(requests.HTTPError) as create:
        rent(once, label="answer-lost")
    assert create.value.response.status_code == 503
    assert create.value.response.json()["error"] == "server_error"
    [row] = vast.show_instances()  # yet the create went through
    assert row["label"] == "answer-lost"

    fakevast.set_faults({"http": [lost]})  # the SDK's own retry then finds its offer taken
    with pytest.raises(requests.HTTPError) as retried:
        rent(vast, label="retried")
    assert retried.value.response.status_code == 410
    assert sorted(r["label"] for r in vast.show_instances()) == ["answer-lost", "retried"]

    rule = {"status": 503, "after_effect": True, "endpoint": "DELETE /api/v0/instances/{id}/"}
    fakevast.set_faults({"http": [rule, rule]})
    for instance in vast.show_instances():
        with pytest.raises(requests.HTTPError) as destroy:
            once.destroy_instance(instance["id"])
        assert destroy.value.response.status_code == 503
    assert fakevast.alive_instances() == [] and vast.show_instances() == []
    statuses = [r["status"] for r in fakevast.requests() if r["method"] in ("PUT", "DELETE")]
    assert statuses == [503, 503, 410, 503, 503]


def raw_statuses(fake: FakeVast, n: int, path: str = "/api/v0/users/current/") -> list[int]:
    """The status of each of `n` plain requests, without any client retry."""
    statuses = []
    for _ in range(n):
        request = urllib.request.Request(
            fake.url + path, headers={"Authorization": f"Bearer {fake.api_key}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                statuses.append(response.status)
        except urllib.error.HTTPError as error:
            statuses.append(error.code)
            error.close()
    return statuses


def test_random_faults_are_random_and_reproducible(fakevast: FakeVast) -> None:
    half = {"seed": 7, "http": [{"status": 503, "probability": 0.5, "count": None}]}
    fakevast.set_faults(half)
    first = raw_statuses(fakevast, 200)
    assert set(first) == {200, 503} and 0.35 < first.count(503) / 200 < 0.65

    fakevast.clear_faults()
    fakevast.set_faults(half)  # the same seed: the same sequence
    assert raw_statuses(fakevast, 200) == first
    fakevast.clear_faults()
    fakevast.set_faults({**half, "seed": 8})
    assert raw_statuses(fakevast, 200) != first


def test_random_faults_count_and_order(fakevast: FakeVast) -> None:
    fakevast.set_faults({"seed": 3, "http": [{"status": 429, "probability": 0.5, "count": 5}]})
    statuses = raw_statuses(fakevast, 60)
    assert statuses.count(429) == 5 and statuses.count(200) == 55  # count caps fired faults
    assert fakevast.faults()["http"] == []

    # A rule that matched but did not fire lets the next one be considered.
    random_then_always = [
        {"status": 429, "probability": 0.5, "count": None},
        {"status": 503, "count": None},
    ]
    fakevast.set_faults({"seed": 3, "http": random_then_always})
    statuses = raw_statuses(fakevast, 60)
    assert set(statuses) == {429, 503} and 15 < statuses.count(429) < 45

    fakevast.clear_faults()  # the use case: 10% of all calls answered 429, 2% 503
    fakevast.set_faults(
        {
            "seed": 1,
            "http": [
                {"status": 429, "probability": 0.1, "count": None},
                {"status": 503, "probability": 0.02, "count": None},
            ],
        }
    )
    statuses = raw_statuses(fakevast, 400)
    assert 0.05 < statuses.count(429) / 400 < 0.15 and statuses.count(503) < 0.05 * 400
    assert statuses.count(200) + statuses.count(429) + statuses.count(503) == 400


def test_new_rule_keys_are_validated(fakevast: FakeVast) -> None:
    for bad in (
        {"http": [{"latency": 0.1, "after_effect": True}]},  # after_effect needs a status
        {"http": [{"status": 503, "after_effect": 1}]},
        {"http": [{"status": 503, "probability": 0}]},
        {"http": [{"status": 503, "probability": 1.5}]},
        {"http": [{"status": 503, "probability": "0.5"}]},
        {"http": [{"status": 503, "garbled": True}]},  # garbled answers the real status
        {"http": [{"garbled": "yes"}]},
        {"http": [{"status": 503, "skip": -1}]},
        {"http": [{"status": 503, "skip": 1.5}]},
        {"seed": "1"},
        {"seed": True},
        {"seed": 1.5},
    ):
        with pytest.raises(urllib.error.HTTPError) as rejected:
            fakevast.set_faults(bad)
        assert rejected.value.code == 400
        assert json.loads(rejected.value.read())["error"] == "invalid_faults"
    assert fakevast.faults()["http"] == []


def test_request_log(fakevast: FakeVast, vast: VastAI) -> None:
    old = [rent(vast), rent(vast)]
    for instance_id in old:
        vast.destroy_instance(instance_id)
    fakevast.set_faults({"http": [{"status": 429, "endpoint": "PUT /api/v0/asks/{id}/"}]})
    new = rent(vast)  # answered 429 first; the SDK retries
    assert raw_statuses(fakevast, 1, "/api/v0/nowhere/") == [404]
    fakevast.ledger()  # the control plane is not logged
    with pytest.raises(urllib.error.HTTPError) as unauthorized:
        urllib.request.urlopen(fakevast.url + "/api/v0/users/current/")
    assert unauthorized.value.code == 401
    fakevast.clear_faults()  # does not clear the log
    vast.destroy_instance(new)

    log = fakevast.requests()
    assert Counter(r["endpoint"] for r in log) == fakevast.ledger()["api_calls"]
    assert [r["t"] for r in log] == sorted(r["t"] for r in log)
    assert not [r for r in log if r["path"].startswith("/_fake/")]
    assert fakevast.requests() == log  # reading it is not logged either
    creates = [r for r in log if r["endpoint"] == "PUT /api/v0/asks/{id}/"]
    assert [r["status"] for r in creates] == [200, 200, 429, 200]
    assert creates[0]["method"] == "PUT" and creates[0]["path"].startswith("/api/v0/asks/")
    nowhere, unauthorized_call = log[-3:-1]  # before the last destroy
    assert (nowhere["endpoint"], nowhere["status"]) == ("GET /api/v0/nowhere/", 404)
    assert (unauthorized_call["endpoint"], unauthorized_call["status"]) == (
        "GET /api/v0/users/current/",
        401,
    )

    # The use case: the run's first create came after every destroy of the old instances.
    old_paths = {f"/api/v0/instances/{i}/" for i in old}
    destroys = [r["t"] for r in log if r["method"] == "DELETE" and r["path"] in old_paths]
    assert len(destroys) == 2 and max(destroys) < creates[2]["t"]


def test_request_log_is_in_arrival_order(fakevast: FakeVast, vast: VastAI) -> None:
    slow = {"latency": 1.0, "endpoint": "GET /api/v0/users/current/"}
    fakevast.set_faults({"http": [slow]})
    waiter = threading.Thread(target=vast.show_user)
    waiter.start()
    fakevast.wait_for(lambda: len(fakevast.requests()) == 1, timeout=5)
    vast.show_instances()
    in_flight = fakevast.requests()
    waiter.join()
    assert [(r["endpoint"], r["status"]) for r in in_flight] == [
        ("GET /api/v0/users/current/", None),  # still being answered
        ("GET /api/v1/instances/", 200),
    ]
    assert fakevast.requests()[0]["status"] == 200
