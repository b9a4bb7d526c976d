"""The fake answers the unmodified vastai SDK (1.9.x, 1.5.6 and 1.0.13-style requests) exactly as
vast-api.md documents, and its instances are real, isolated sshds. Real HTTP and SSH, no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import paramiko
import pytest
import requests
from vastai import VastAI
from vastai.api.query import offers_alias, offers_fields

from tests.fakevast import clients
from tests.fakevast.catalog import DEFAULT_OFFERS, Catalog
from tests.fakevast.clients import public_key, rent, run, sdk, ssh_login, wait_status
from tests.fakevast.harness import FakeVast

OFFERS = {o["id"]: o for o in json.loads(DEFAULT_OFFERS.read_text())}
SCENARIO = Path(clients.__file__).with_name("sdk_scenario.py")
IMAGE = clients.DEFAULT_IMAGE


def raw(
    fake: FakeVast, method: str, path: str, body: Any = None, headers: dict | None = None
) -> tuple[int, dict[str, str], Any]:
    """A plain urllib request (no SDK): status, headers, parsed JSON body."""
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    request = urllib.request.Request(fake.url + path, data=data, method=method)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def bearer(fake: FakeVast) -> dict[str, str]:
    return {"Authorization": f"Bearer {fake.api_key}"}


def default_visible(offer: dict) -> bool:
    """What the SDK's default filters (verified, rentable, not external) let through."""
    return offer["verification"] == "verified" and offer["rentable"] and not offer["external"]


def dph(offer: dict, storage: float = 5.0, bid: bool = False) -> float:
    base = offer["min_bid"] if bid else offer["dph_base"]
    return base + offer.get("storage_cost", 0.15) * storage / 720


# -- search ------------------------------------------------------------------------------------


SEARCHES: list[tuple[str, Any]] = [
    ("gpu_name=RTX_4090 num_gpus=1", lambda o: o["gpu_name"] == "RTX 4090" and o["num_gpus"] == 1),
    ("num_gpus>=2 reliability>0.99", lambda o: o["num_gpus"] >= 2 and o["reliability"] > 0.99),
    ("geolocation in [PL,DE]", lambda o: o["geolocation"][-2:] in ("PL", "DE")),
    ("geolocation notin [US,CA]", lambda o: o["geolocation"][-2:] not in ("US", "CA")),
    (
        "datacenter=True gpu_name!=RTX_4090",
        lambda o: o["hosting_type"] == 1 and o["gpu_name"] != "RTX 4090",
    ),
    ("cpu_ram>=64 dph_total<=1.5", lambda o: o["cpu_ram"] >= 64000 and dph(o) <= 1.5),
    (
        "cuda_vers>=12.5 compute_cap>=890",
        lambda o: o["cuda_max_good"] >= 12.5 and o["compute_cap"] >= 890,
    ),
    (
        "driver_version>=550.0.0 direct_port_count>0",
        lambda o: int(o["driver_version"].split(".")[0]) >= 550 and o["direct_port_count"] > 0,
    ),
    (
        "gpu_name in [L40S,H100_SXM] inet_down>1000",
        lambda o: o["gpu_name"] in ("L40S", "H100 SXM") and o["inet_down"] > 1000,
    ),
    ("gpu_name=RTX_5090", lambda o: False),
]


@pytest.mark.parametrize(("query", "expect"), SEARCHES, ids=[q for q, _ in SEARCHES])
def test_search_filters(fakevast: FakeVast, query: str, expect: Any) -> None:
    found = sdk(fakevast).search_offers(query=query)
    wanted = {i for i, o in OFFERS.items() if default_visible(o) and expect(o)}
    assert {o["id"] for o in found} == wanted
    scores = [o["score"] for o in found]
    assert scores == sorted(scores, reverse=True)  # default order: score-


def test_catalogue_knows_every_field_the_sdk_can_search() -> None:
    """Unknown fields are a 400; that must never hit a field the SDK itself offers."""
    known = Catalog.load().fields
    assert set(offers_fields) | set(offers_alias.values()) <= known


def test_search_defaults_can_be_lifted(fakevast: FakeVast) -> None:
    vast = sdk(fakevast)
    unverified = vast.search_offers(query="verified=False rentable=any external=any")
    assert {o["id"] for o in unverified} == {
        i for i, o in OFFERS.items() if o["verification"] != "verified"
    }
    everything = vast.search_offers(query="verified=any rentable=any external=any")
    assert len(everything) == len(OFFERS)
    external = vast.search_offers(query="external=True")
    assert [o["id"] for o in external] == [i for i, o in OFFERS.items() if o["external"]]


def test_search_order_limit_pricing_and_bids(fakevast: FakeVast) -> None:
    vast = sdk(fakevast)
    found = vast.search_offers(query="gpu_name=RTX_4090", order="num_gpus-,dph_total", storage=30)
    keys = [(-o["num_gpus"], o["dph_total"]) for o in found]
    assert keys == sorted(keys) and len({k[0] for k in keys}) > 1
    for offer in found:
        assert offer["dph_total"] == pytest.approx(dph(OFFERS[offer["id"]], storage=30))
        assert offer["is_bid"] is False and offer["rented"] is False

    cheapest = vast.search_offers(query="num_gpus=1", order="dph_total", limit=3, storage=30)
    everything = vast.search_offers(query="num_gpus=1", order="dph_total", storage=30)
    assert cheapest == everything[:3]

    bids = vast.search_offers(query="gpu_name=RTX_3090", type="bid", order="dph_total")
    assert bids and all(b["is_bid"] for b in bids)
    for offer in bids:
        assert offer["dph_total"] == pytest.approx(dph(OFFERS[offer["id"]], bid=True))
    # The computed price is what dph_total filters on: allocated storage can push it over.
    limit = dph(OFFERS[found[-1]["id"]], storage=30)
    assert found[-1]["id"] in {
        o["id"] for o in vast.search_offers(query=f"dph<={limit}", storage=30)
    }
    assert found[-1]["id"] not in {
        o["id"] for o in vast.search_offers(query=f"dph<={limit}", storage=300)
    }


@pytest.mark.parametrize(
    "body",
    [
        {"no_such_field": {"eq": 1}},
        {"num_gpus": {"about": 1}},
        {"num_gpus": {"gte": "many"}},
        {"gpu_name": {"in": "RTX 4090"}},
        {"order": [["no_such_field", "asc"]]},
        {"type": "interruptible"},
        {"limit": "5"},
    ],
)
def test_search_rejects_what_the_api_rejects(fakevast: FakeVast, body: dict) -> None:
    status, headers, answer = raw(fakevast, "POST", "/api/v0/bundles/", body, bearer(fakevast))
    assert (status, answer["error"]) == (400, "invalid_request")
    assert headers["Content-Type"] == "application/json"


def test_ondemand_spelling_and_rented_offers_disappear(fakevast: FakeVast) -> None:
    vast = sdk(fakevast)
    body = {"gpu_name": {"eq": "RTX 3060"}, "rented": {"eq": False}, "type": "ondemand"}
    status, _, answer = raw(fakevast, "POST", "/api/v0/bundles", body, bearer(fakevast))
    offer_id = answer["offers"][0]["id"]
    assert status == 200 and len(answer["offers"]) == 2
    instance_id = vast.create_instance(id=offer_id, image=IMAGE, disk=10, runtype="ssh")[
        "new_contract"
    ]
    assert offer_id not in {o["id"] for o in vast.search_offers(query="gpu_name=RTX_3060")}
    with pytest.raises(requests.HTTPError) as taken:
        vast.create_instance(id=offer_id, image=IMAGE, disk=10, runtype="ssh")
    assert taken.value.response.status_code == 410
    assert taken.value.response.json() == {
        "success": False,
        "error": "no_such_ask",
        "msg": f"error 410/3907: no_such_ask Instance type {offer_id} is no longer available.",
        "ask_id": offer_id,
    }
    vast.destroy_instance(instance_id)
    assert offer_id in {o["id"] for o in vast.search_offers(query="gpu_name=RTX_3060")}


# -- create, timeline, logs, destroy -----------------------------------------------------------


def test_args_instance_lifecycle(fakevast_factory: Any) -> None:
    fake = fakevast_factory(boot_seconds=1.0)
    vast = sdk(fake)
    instance_id = rent(
        vast,
        runtype="args",
        label="snakemake-vastai:run1:a",
        env={"GREETING": "hello", "-p 8080:8080": "1"},
        onstart_cmd="/bin/sh",
        args=["-c", 'echo "$GREETING from $(hostname)"; sleep 0.5; echo done'],
    )
    first = vast.show_instance(instance_id)
    _instance_row_checks(first, OFFERS[fake.ledger()["instances"][0]["offer_id"]])
    assert first["actual_status"] is None and first["intended_status"] == "running"
    assert first["cur_state"] == "running" and first["ports"] == {}
    assert isinstance(first["start_date"], float)
    assert first["extra_env"] == {"GREETING": "hello", "-p 8080:8080": "1"}  # the SDK's dict
    loading = wait_status(vast, instance_id, "loading", timeout=2)
    assert loading["status_msg"] == f"Pulling image {IMAGE}"
    running = wait_status(vast, instance_id, "running", timeout=10)
    assert running["status_msg"] == f"success, running {IMAGE.replace(':', '_')}/args"
    assert running["public_ipaddr"] == "127.0.0.1" and running["ssh_port"] is None
    wait_status(vast, instance_id, "exited", timeout=10)

    logs = vast.logs(instance_id, tail="1")
    assert logs == "done\n"
    assert vast.logs(instance_id).startswith("hello from ")

    ledger_row = fake.ledger()["instances"][0]
    offer = OFFERS[ledger_row["offer_id"]]
    assert ledger_row["status"] == "exited" and ledger_row["label"] == "snakemake-vastai:run1:a"
    assert ledger_row["gpu_name"] == offer["gpu_name"] and ledger_row["image"] == IMAGE
    assert ledger_row["running_at"] - ledger_row["created_at"] >= 1.0
    assert ledger_row["dph_total"] == pytest.approx(dph(offer, storage=16))

    assert vast.destroy_instance(instance_id)["success"] is True
    assert vast.show_instance(instance_id) is None
    with pytest.raises(requests.HTTPError) as again:
        vast.destroy_instance(instance_id)
    assert again.value.response.status_code == 404
    assert again.value.response.json()["error"] == "no_such_instance"
    row = fake.ledger()["instances"][0]
    assert row["status"] == "destroyed" and row["ended_at"] >= row["running_at"]
    calls = fake.ledger()["api_calls"]
    assert calls["DELETE /api/v0/instances/{id}/"] == 2
    assert calls["PUT /api/v0/instances/request_logs/{id}/"] == 2
    assert not any(key.startswith(("GET /_fake", "GET /_s3")) for key in calls)


def _instance_row_checks(row: dict, offer: dict) -> None:
    for field in ("gpu_name", "num_gpus", "cpu_ram", "geolocation", "machine_id", "host_id"):
        assert row[field] == offer[field], field
    assert row["gpu_totalram"] == offer["gpu_ram"] * offer["num_gpus"]
    assert isinstance(row["extra_env"], dict)  # the SDK turned the list of pairs into a dict
    assert isinstance(row["duration"], float) and row["disk_space"] == 16


def test_show_instances_pages_past_25(fakevast_factory: Any, tmp_path: Path) -> None:
    offers_file = tmp_path / "offers.json"
    offers_file.write_text(
        json.dumps([{"id": 700 + n, "dph_base": 0.1 + n / 100} for n in range(30)])
    )
    fake = fakevast_factory(boot_seconds=600, offers=offers_file)  # never boots: no sshd needed
    vast = sdk(fake)
    ids = [
        vast.create_instance(
            id=700 + n, image=IMAGE, disk=16, label="even" if n % 2 == 0 else "odd"
        )["new_contract"]
        for n in range(30)
    ]
    listed = vast.show_instances()
    assert [r["id"] for r in listed] == ids
    assert fake.ledger()["api_calls"]["GET /api/v1/instances/"] == 2
    assert all(row["machine_id"] == row["bundle_id"] and row["gpu_name"] for row in listed)

    page = vast.show_instances_v1(
        {
            "select_filters": {"label": {"eq": "odd"}},
            "order_by": [{"col": "id", "dir": "desc"}],
            "limit": 10,
        }
    )
    assert [r["id"] for r in page["instances"]] == ids[1::2][::-1][:10]
    assert page["instances_found"] == 15 and page["total_instances"] == 30
    assert page["label_counts"] == {"even": 15, "odd": 15} and page["next_token"]
    rest = vast.show_instances_v1(
        {"select_filters": {"label": {"eq": "odd"}}, "order_by": [{"col": "id", "dir": "desc"}],
         "limit": 10, "after_token": page["next_token"]}
    )  # fmt: skip
    assert [r["id"] for r in rest["instances"]] == ids[1::2][::-1][10:]
    assert rest["next_token"] is None
    both = vast.show_instances_v1(
        {"select_filters": {"label": {"in": ["odd", "even"]}}, "limit": 100}
    )
    assert len(both["instances"]) == 25 and both["instances_found"] == 30  # at most 25 per page

    for bad in ({"select_filters": {"nope": {"eq": 1}}}, {"order_by": [{"col": "nope"}]}):
        with pytest.raises(requests.HTTPError) as rejected:
            vast.show_instances_v1(bad)
        assert rejected.value.response.json()["error"] == "invalid_request"
    with pytest.raises(requests.HTTPError) as token:
        vast.show_instances_v1({"after_token": "not-a-token"})
    assert token.value.response.json()["error"] == "invalid_token"
    for instance_id in ids:
        vast.destroy_instance(instance_id)


# -- other SDKs and old request forms ----------------------------------------------------------


def _run_scenario(python: str, fake: FakeVast) -> dict:
    env = {**os.environ, "VAST_URL": fake.url, "VAST_API_KEY": fake.api_key}
    done = subprocess.run(
        [python, str(SCENARIO)], env=env, capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _check_scenario(report: dict, fake: FakeVast) -> None:
    (first_id, first_price, _), _ = report["offers"]
    assert first_price == pytest.approx(dph(OFFERS[first_id], storage=20))
    args_id, ssh_id = (created["new_contract"] for created in report["created"])
    assert report["attached"] == {"success": True, "msg": "SSH key attached successfully"}
    assert report["account_key"]["key"]["deleted_at"] is None
    assert report["labelled"]["success"] is True
    assert report["ssh_row"]["ssh_host"] == "127.0.0.1" and report["ssh_row"]["ssh_port"] > 0
    assert report["listed"] == [
        [args_id, "scenario-args", {"GREETING": "scenario-ok"}],
        [ssh_id, "scenario-ssh-2", {}],
    ]
    assert report["logs"] == "scenario-ok\n"
    assert report["after_destroy"] is None
    assert report["second_destroy"][0] == 404
    assert "balance" in report["user_keys"] and "api_key" not in report["user_keys"]
    calls = fake.ledger()["api_calls"]
    assert calls["GET /api/v1/instances/"] == 1 and "GET /api/v0/instances/" not in calls


def test_sdk_follows_vast_url_env_var(fakevast: FakeVast) -> None:
    report = _run_scenario(sys.executable, fakevast)
    assert report["version"].startswith("1.9")
    _check_scenario(report, fakevast)


@pytest.fixture(scope="session")
def oldest_sdk_python(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A virtualenv with vastai 1.5.6 (pyproject's lower bound), built once and kept in
    pytest's cache (in a temporary folder when the cache is switched off)."""
    cache = getattr(request.config, "cache", None)
    venv = Path(cache.mkdir("vastai-1.5.6-venv")) if cache else tmp_path_factory.mktemp("sdk")
    python = venv / "bin" / "python"
    if not (venv / "ready").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "vastai==1.5.6"], check=True, timeout=600
        )
        (venv / "ready").touch()
    return str(python)


@pytest.mark.slow
def test_oldest_supported_sdk(fakevast: FakeVast, oldest_sdk_python: str) -> None:
    report = _run_scenario(oldest_sdk_python, fakevast)
    assert report["version"] == "1.5.6"
    _check_scenario(report, fakevast)


def test_1_0_13_style_requests(fakevast: FakeVast) -> None:
    """Key in the query string, the v0 list without a trailing slash, env as a raw string."""
    key = f"?api_key={fakevast.api_key}"
    flags = "-e A=1 -e B='x y' -p 22:22 -p 8000:8000/udp"
    status, _, created = raw(
        fakevast,
        "PUT",
        f"/api/v0/asks/9210022/{key}",
        {
            "client_id": "me",
            "image": IMAGE,
            "env": flags,
            "disk": 10,
            "runtype": "ssh",
            "price": None,
        },
    )
    assert status == 200 and created["success"] is True
    status, _, listed = raw(fakevast, "GET", f"/api/v0/instances{key}&owner=me")
    assert status == 200 and [r["id"] for r in listed["instances"]] == [created["new_contract"]]
    assert listed["instances"][0]["extra_env"] == [
        ["A", "1"],
        ["B", "x y"],
        ["-p 22:22", "1"],
        ["-p 8000:8000/udp", "1"],
    ]
    path = f"/api/v0/instances/{created['new_contract']}/{key}"
    assert raw(fakevast, "DELETE", path, {})[0] == 200
    assert raw(fakevast, "GET", f"/api/v0/instances/{created['new_contract']}/{key}&owner=me")[
        2
    ] == {"instances": None}
    calls = fakevast.ledger()["api_calls"]
    assert calls["GET /api/v0/instances/"] == 1 and calls["PUT /api/v0/asks/{id}/"] == 1


@pytest.mark.parametrize(
    ("body", "runtype"),
    [({"args": ["-c", "true"], "onstart": "/bin/sh"}, "args"), ({}, "ssh")],
)
def test_absent_runtype_defaults(fakevast: FakeVast, body: dict, runtype: str) -> None:
    body = {"image": IMAGE, "disk": 10, **body}
    status, _, created = raw(fakevast, "PUT", "/api/v0/asks/9210023/", body, bearer(fakevast))
    assert status == 200
    row = sdk(fakevast).show_instance(created["new_contract"])
    assert row["image_runtype"] == runtype
    sdk(fakevast).destroy_instance(created["new_contract"])


# -- transport: auth, paths, envelopes ---------------------------------------------------------


def test_auth_paths_and_envelopes(fakevast: FakeVast) -> None:
    unauthorized = {"success": False, "error": "auth_error", "msg": "Invalid user key"}
    assert raw(fakevast, "GET", "/api/v0/users/current")[::2] == (401, unauthorized)
    wrong = {"Authorization": "Bearer wrong"}
    assert raw(fakevast, "GET", "/api/v0/users/current", headers=wrong)[::2] == (401, unauthorized)
    assert raw(fakevast, "GET", "/api/v0/users/current?api_key=wrong")[0] == 401
    for path in ("/api/v0/users/current", "/api/v0/users/current/", "//api/v0//users/current"):
        status, headers, user = raw(fakevast, "GET", path, headers=bearer(fakevast))
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert user["balance"] == 100.0 and user["can_pay"] is True
    assert raw(fakevast, "GET", "/api/v0/nothing/here/", headers=bearer(fakevast))[0] == 404
    assert raw(fakevast, "GET", "/api/v0/bundles/", headers=bearer(fakevast))[0] == 405
    bad_json = raw(fakevast, "POST", "/api/v0/bundles/", b"{nope", bearer(fakevast))
    assert bad_json[0] == 400 and bad_json[2]["error"] == "invalid_request"
    # A server_url with a trailing slash makes the SDK send //api/...: still served.
    slashed = VastAI(api_key=fakevast.api_key, server_url=fakevast.url + "/", raw=True, quiet=True)
    user = slashed.show_user()
    assert user["id"] > 0 and "api_key" not in user
    calls = fakevast.ledger()["api_calls"]
    assert calls["GET /api/v0/users/current/"] == 7
    assert calls["GET /api/v0/nothing/here/"] == 1


@pytest.mark.parametrize(
    ("change", "status", "error"),
    [
        ({"disk": 4}, 400, "invalid_args"),
        ({"disk": 100_000}, 400, "invalid_args"),
        ({"image": "Not An Image"}, 400, "invalid_args"),
        ({"image": None}, 400, "invalid_args"),
        ({"label": "x" * 257}, 400, "invalid_args"),
        ({"runtype": "ssh args"}, 400, "invalid_args"),
        ({"env": ["A=1"]}, 400, "invalid_args"),
        ({"args": "echo hi", "runtype": "args"}, 400, "invalid_args"),
        ({"onstart": "x" * 4049}, 400, "invalid_args"),
        ({"price": 500}, 400, "invalid_price"),
        ({"price": 0.0001}, 400, "invalid_price"),
    ],
)
def test_create_rejects_bad_requests(
    fakevast: FakeVast, change: dict, status: int, error: str
) -> None:
    body = {"image": IMAGE, "disk": 10, "runtype": "ssh", **change}
    answer = raw(fakevast, "PUT", "/api/v0/asks/9210001/", body, bearer(fakevast))
    assert answer[0] == status and answer[2]["error"] == error and answer[2]["ask_id"] == 9210001
    assert answer[2]["msg"].startswith("error 400/3467: Invalid args: ")
    assert fakevast.alive_instances() == []


def test_create_on_unknown_or_unrentable_offer(fakevast: FakeVast) -> None:
    body = {"image": IMAGE, "disk": 10}
    status, _, answer = raw(fakevast, "PUT", "/api/v0/asks/123/", body, bearer(fakevast))
    assert (status, answer) == (
        404,
        {
            "success": False,
            "error": "invalid_args",
            "msg": "error 404/3603: no_such_ask Instance type by id 123 is not available.",
            "ask_id": 123,
        },
    )
    unrentable = next(i for i, o in OFFERS.items() if not o["rentable"])
    status, _, answer = raw(fakevast, "PUT", f"/api/v0/asks/{unrentable}/", body, bearer(fakevast))
    assert (status, answer["error"]) == (410, "no_such_ask")


def test_label_reboot_stop(fakevast: FakeVast) -> None:
    vast = sdk(fakevast)
    instance_id = rent(vast)
    wait_status(vast, instance_id, "running")
    assert vast.label_instance(instance_id, "relabelled")["success"] is True
    assert vast.show_instance(instance_id)["label"] == "relabelled"
    with pytest.raises(requests.HTTPError) as too_long:
        vast.label_instance(instance_id, "x" * 1025)
    assert too_long.value.response.json()["error"] == "label_too_long"
    with pytest.raises(requests.HTTPError) as missing:
        vast.label_instance(1, "nobody")
    assert missing.value.response.status_code == 404

    assert vast.reboot_instance(instance_id) == {"success": True}
    assert vast.show_instance(instance_id)["actual_status"] == "rebooting"
    wait_status(vast, instance_id, "running", timeout=5)

    assert vast.stop_instance(instance_id)["success"] is True
    row = vast.show_instance(instance_id)
    states = {row[k] for k in ("actual_status", "intended_status", "cur_state", "next_state")}
    assert states == {"stopped"}
    assert vast.start_instance(instance_id)["success"] is True  # test_fakevast_stop_start.py
    vast.destroy_instance(instance_id)


# -- instances are real sshds ------------------------------------------------------------------


def _processes_rooted_in(path: Path) -> list[int]:
    """PIDs whose root directory (chroot) lies under `path`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                root = os.readlink(f"/proc/{entry}/root")
            except OSError:
                continue
            if root.startswith(str(path)):
                found.append(int(entry))
    return found


def test_ssh_instances_are_isolated_and_destroy_cleans_up(
    fakevast_factory: Any, ssh_key: paramiko.PKey, tmp_path: Path
) -> None:
    fake = fakevast_factory(boot_seconds=0.5, state_dir=tmp_path)
    vast = sdk(fake)
    first = rent(vast, query="direct_port_count>0 gpu_name=RTX_4090", runtype="ssh_direc ssh_proxy")
    second = rent(vast, query="direct_port_count=0", runtype="ssh_direc ssh_proxy")
    for instance_id in (first, second):  # attached while still loading: in force once running
        assert vast.show_instance(instance_id)["actual_status"] in (None, "loading")
        vast.attach_ssh(instance_id, public_key(ssh_key))
    one, two = (wait_status(vast, i, "running") for i in (first, second))
    assert one["ports"]["22/tcp"][0]["HostIp"] == "0.0.0.0"
    direct_port = int(one["ports"]["22/tcp"][0]["HostPort"])
    assert direct_port != one["ssh_port"] and "22/tcp" not in two["ports"]
    assert two["public_ipaddr"] == "127.0.0.1"

    session = ssh_login(one["ssh_host"], one["ssh_port"], ssh_key)
    run(session, "echo first > /root/marker && mkdir -p /workspace/out")
    via_direct = ssh_login(one["public_ipaddr"], direct_port, ssh_key)
    assert run(via_direct, "cat /root/marker") == "first\n"
    via_direct.close()
    other = ssh_login(two["ssh_host"], two["ssh_port"], ssh_key)
    assert run(other, "test -e /root/marker && echo seen || echo unseen") == "unseen\n"
    assert run(other, "python -c 'print(6 * 7)'") == "42\n"
    other.close()
    assert fake.ledger()["ssh_bytes"]["down"] > 0

    state = tmp_path / f"inst-{first}"
    assert state.exists() and _processes_rooted_in(state)
    vast.destroy_instance(first)
    assert not state.exists()
    assert _processes_rooted_in(state) == []
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):
        run(session, "true", timeout=5)
    session.close()
    with pytest.raises((paramiko.SSHException, OSError)):
        ssh_login(one["ssh_host"], one["ssh_port"], ssh_key, timeout=3).close()
    vast.destroy_instance(second)


def test_account_keys_reach_current_and_new_instances(
    fakevast: FakeVast, ssh_key: paramiko.PKey
) -> None:
    vast = sdk(fakevast)
    before = wait_status(vast, rent(vast), "running")
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(before["ssh_host"], before["ssh_port"], ssh_key).close()
    added = vast.create_ssh_key(public_key(ssh_key))
    assert added["success"] is True and added["key"]["public_key"] == public_key(ssh_key)
    assert [k["key"] for k in vast.show_ssh_keys()] == [public_key(ssh_key)]
    after = wait_status(vast, rent(vast), "running")
    for row in (before, after):
        ssh_login(row["ssh_host"], row["ssh_port"], ssh_key).close()
    assert vast.show_user()["ssh_key"] == public_key(ssh_key)
    vast.delete_ssh_key(added["key"]["id"])
    assert vast.show_ssh_keys() == []

    for body, error in (({}, "no_ssh_key"), ({"ssh_key": "not a key"}, "invalid_args")):
        status, _, answer = raw(fakevast, "POST", "/api/v0/ssh/", body, bearer(fakevast))
        assert (status, answer["error"]) == (400, error)
    for row in (before, after):
        vast.destroy_instance(row["id"])


def test_fake_process_exits_cleanly_and_destroys_everything(tmp_path: Path) -> None:
    fake = FakeVast(boot_seconds=0, state_dir=tmp_path, rate_limits=False)  # polls freely
    vast = sdk(fake)
    instance_id = rent(vast)
    wait_status(vast, instance_id, "running")
    assert _processes_rooted_in(tmp_path)
    fake.stop()
    assert fake._process.returncode == 0
    assert _processes_rooted_in(tmp_path) == [] and list(tmp_path.iterdir()) == []
    fake.stop()  # idempotent
