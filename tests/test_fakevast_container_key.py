"""Vast.ai's scoped per-instance key, as the fake gives it: ``CONTAINER_ID`` and
``CONTAINER_API_KEY`` in the environment of the instance's main process only (read as root from
``/proc/1/environ``; SSH sessions do not inherit them), good for showing, stopping and destroying
that one instance and nothing else. Real HTTP and SSH, no mocks."""

from __future__ import annotations

import getpass
import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import requests
from vastai import VastAI

from tests.fakevast import container as container_module
from tests.fakevast.catalog import Catalog
from tests.fakevast.clients import (
    public_key,
    rent,
    run,
    sdk,
    ssh_login,
    wait_for,
    wait_status,
)
from tests.fakevast.container import Container, ContainerSpec
from tests.fakevast.harness import FakeVast
from tests.fakevast.market import Market

SCOPED = ("CONTAINER_ID", "CONTAINER_API_KEY")
needs_sshd = pytest.mark.skipif(
    not Path("/usr/sbin/sshd").exists(), reason="needs OpenSSH's sshd at /usr/sbin/sshd"
)
needs_namespaces = pytest.mark.skipif(
    not container_module.namespaces_available(), reason="needs root to create namespaces"
)
pytestmark = needs_sshd

# Run inside an instance by its own python: one API call, printed as "<status> <json body>".
_INSIDE_CALL = """\
import json, sys, urllib.error, urllib.request
method, url, key, body = sys.argv[1:5]
request = urllib.request.Request(url, data=body.encode() or None, method=method)
request.add_header("Authorization", "Bearer " + key)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(request, timeout=30) as answer:
        print(answer.status, answer.read().decode())
except urllib.error.HTTPError as error:
    print(error.code, error.read().decode())
"""


def call(
    fake: FakeVast, method: str, path: str, key: str | None, body: Any = None
) -> tuple[int, Any]:
    """One API request from the test process with `key` as the Bearer token."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = requests.request(method, fake.url + path, json=body, headers=headers, timeout=30)
    return response.status_code, response.json()


def inside_call(
    client: paramiko.SSHClient,
    fake: FakeVast,
    method: str,
    path: str,
    key: str,
    body: Any = None,
) -> tuple[int, Any]:
    """The same request made from inside the instance, with the instance's own python."""
    data = "" if body is None else json.dumps(body)
    argv = ["python3", "-c", _INSIDE_CALL, method, fake.url + path, key, data]
    status, _, text = run(client, shlex.join(argv)).strip().partition(" ")
    return int(status), json.loads(text)


def environ(raw: str) -> dict[str, str]:
    """A NUL- (``/proc/<pid>/environ``) or newline-separated (``env``) environment."""
    entries = raw.replace("\0", "\n").splitlines()
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def main_env(client: paramiko.SSHClient) -> dict[str, str]:
    return environ(run(client, "cat /proc/1/environ | tr '\\0' '\\n'"))


def forbidden(status_and_body: tuple[int, Any]) -> bool:
    status, body = status_and_body
    return status == 403 and body["success"] is False and body["error"] == "forbidden"


def ledger_row(fake: FakeVast, instance_id: int) -> dict[str, Any]:
    return next(row for row in fake.ledger()["instances"] if row["id"] == instance_id)


@pytest.fixture
def vast(fakevast: FakeVast) -> VastAI:
    return sdk(fakevast)


@pytest.fixture
def rented(
    fakevast: FakeVast, vast: VastAI, ssh_key: paramiko.PKey
) -> Iterator[list[tuple[int, paramiko.SSHClient]]]:
    """Two running ssh instances with a root session each; destroys whatever is left."""
    made: list[tuple[int, paramiko.SSHClient]] = []
    for query in ("gpu_name=RTX_4090 num_gpus=1", "gpu_name=RTX_3090 num_gpus=1"):
        instance_id = rent(vast, query, onstart_cmd='echo "$CONTAINER_ID" > /root/onstart-saw')
        vast.attach_ssh(instance_id, public_key(ssh_key))
        row = wait_status(vast, instance_id, "running")
        made.append((instance_id, ssh_login(row["ssh_host"], row["ssh_port"], ssh_key)))
    yield made
    for instance_id, client in made:
        client.close()
        if instance_id in {row["id"] for row in fakevast.alive_instances()}:
            vast.destroy_instance(instance_id)


def test_main_process_has_the_key_and_ssh_sessions_do_not(
    fakevast: FakeVast, rented: list[tuple[int, paramiko.SSHClient]]
) -> None:
    (first, client), (second, other) = rented
    env = main_env(client)
    assert env["CONTAINER_ID"] == str(first)
    assert re.fullmatch(r"[0-9a-f]{64}", env["CONTAINER_API_KEY"])
    assert main_env(other)["CONTAINER_ID"] == str(second)
    assert main_env(other)["CONTAINER_API_KEY"] != env["CONTAINER_API_KEY"]
    assert run(client, "id -u") == "0\n"

    session = environ(run(client, "env"))
    assert "HOME" in session and not set(SCOPED) & set(session)
    login_shell = environ(run(client, "bash -lc env"))
    assert "PATH" in login_shell and not set(SCOPED) & set(login_shell)
    assert "CONTAINER" not in run(client, "cat /etc/environment")
    # The onstart script, which the main process starts, inherits them (as on Vast.ai).
    wait = "for i in $(seq 100); do [ -s /root/onstart-saw ] && break; sleep 0.1; done"
    assert run(client, f"{wait}; cat /root/onstart-saw") == f"{first}\n"


def test_container_key_shows_and_destroys_only_its_own_instance_from_inside(
    fakevast: FakeVast, vast: VastAI, rented: list[tuple[int, paramiko.SSHClient]]
) -> None:
    (first, client), (second, _) = rented
    key = main_env(client)["CONTAINER_API_KEY"]

    status, shown = inside_call(client, fakevast, "GET", f"/api/v0/instances/{first}/", key)
    assert status == 200 and shown["instances"]["id"] == first
    assert forbidden(inside_call(client, fakevast, "GET", f"/api/v0/instances/{second}/", key))
    assert forbidden(inside_call(client, fakevast, "DELETE", f"/api/v0/instances/{second}/", key))
    assert forbidden(inside_call(client, fakevast, "GET", "/api/v1/instances/", key))
    assert forbidden(inside_call(client, fakevast, "POST", "/api/v0/bundles/", key, {}))
    assert {row["id"] for row in fakevast.alive_instances()} == {first, second}
    assert ledger_row(fakevast, first)["destroyed_by"] is None

    # Like a watchdog: a detached process destroys its own instance, which takes it down too.
    argv = ["python3", "-c", _INSIDE_CALL, "DELETE", f"{fakevast.url}/api/v0/instances/{first}/"]
    destroy = shlex.join([*argv, key, ""])
    run(client, f"setsid nohup {destroy} > /root/destroy.out 2>&1 < /dev/null &")

    def answered() -> list[tuple[str, int | None]]:
        mine = [r for r in fakevast.requests() if r["path"] == f"/api/v0/instances/{first}/"]
        return [(r["method"], r["status"]) for r in mine]

    fakevast.wait_for(lambda: answered()[-1] == ("DELETE", 200), timeout=20)
    row = ledger_row(fakevast, first)
    assert row["status"] == "destroyed"
    assert row["destroyed_by"] == "container" and row["stopped_by"] is None

    # The key of a destroyed instance still shows (null) and destroys (404) it, nothing else.
    assert call(fakevast, "GET", f"/api/v0/instances/{first}/", key) == (200, {"instances": None})
    status, body = call(fakevast, "DELETE", f"/api/v0/instances/{first}/", key)
    assert status == 404 and body["error"] == "no_such_instance"
    assert forbidden(call(fakevast, "GET", f"/api/v0/instances/{second}/", key))
    # The user's key still works everywhere.
    assert [row["id"] for row in vast.show_instances()] == [second]
    assert vast.show_instance(second)["id"] == second
    assert vast.destroy_instance(second)["success"] is True
    assert ledger_row(fakevast, second)["destroyed_by"] == "user"


def test_container_key_is_refused_everywhere_else(
    fakevast: FakeVast,
    vast: VastAI,
    rented: list[tuple[int, paramiko.SSHClient]],
    ssh_key: paramiko.PKey,
) -> None:
    (first, client), (second, _) = rented
    key = main_env(client)["CONTAINER_API_KEY"]
    own, other = f"/api/v0/instances/{first}/", f"/api/v0/instances/{second}/"
    offer_id = vast.search_offers(query="num_gpus=1", limit=1)[0]["id"]
    refused = [
        ("GET", other, None),
        ("PUT", other, {"state": "stopped"}),
        ("DELETE", other, None),
        ("GET", "/api/v1/instances/", None),
        ("GET", "/api/v0/instances/?owner=me", None),
        ("POST", "/api/v0/bundles/", {"limit": 1}),
        ("PUT", f"/api/v0/asks/{offer_id}/", {"image": "vastai/base-image", "disk": 16}),
        ("PUT", own, {"label": "mine"}),
        ("PUT", f"/api/v0/instances/reboot/{first}/", {}),
        ("PUT", f"/api/v0/instances/request_logs/{first}/", {"tail": "10"}),
        ("POST", f"/api/v0/instances/{first}/ssh/", {"ssh_key": public_key(ssh_key)}),
        ("GET", "/api/v0/ssh/", None),
        ("GET", "/api/v0/users/current/", None),
        ("POST", own, {}),  # a method the instance route does not have
        ("GET", "/api/v0/nowhere/", None),
    ]
    for method, path, body in refused:
        answer = call(fakevast, method, path, key, body)
        assert forbidden(answer), (method, path, answer)
        assert answer[1]["msg"], answer
    status, body = call(fakevast, "GET", f"/api/v0/users/current/?api_key={key}", None)
    assert status == 403 and body["error"] == "forbidden"
    assert call(fakevast, "GET", own, "not-a-key")[0] == 401
    assert call(fakevast, "GET", own, key[:-1] + "x")[0] == 401

    # The unmodified SDK, given only the container key: its own instance, and nothing else.
    scoped = VastAI(api_key=key, server_url=fakevast.url, retry=1, raw=True, quiet=True)
    assert scoped.show_instance(first)["id"] == first
    with pytest.raises(requests.HTTPError) as refused_list:
        scoped.show_instances()
    assert refused_list.value.response.status_code == 403

    # A stop with the container key is recorded; the user's key still does everything.
    assert call(fakevast, "PUT", own, key, {"state": "stopped"})[0] == 200
    assert wait_status(vast, first, "stopped")["intended_status"] == "stopped"
    assert ledger_row(fakevast, first)["stopped_by"] == "container"
    assert ledger_row(fakevast, second)["stopped_by"] is None
    assert vast.label_instance(first, "still mine")["success"] is True
    assert len(vast.search_offers(query="num_gpus=1")) > 0
    assert {row["id"] for row in vast.show_instances()} == {first, second}
    assert vast.destroy_instance(first)["success"] is True
    assert ledger_row(fakevast, first)["destroyed_by"] == "user"
    assert ledger_row(fakevast, second)["destroyed_by"] is None
    status, body = call(fakevast, "DELETE", own, key)  # gone, whoever destroyed it
    assert status == 404 and body["error"] == "no_such_instance"
    assert forbidden(call(fakevast, "DELETE", other, key))
    assert {row["id"] for row in fakevast.alive_instances()} == {second}


def test_scoped_refusals_are_logged_and_come_before_http_faults(
    fakevast: FakeVast, vast: VastAI, rented: list[tuple[int, paramiko.SSHClient]]
) -> None:
    (first, client), _ = rented
    key = main_env(client)["CONTAINER_API_KEY"]
    fakevast.set_faults({"http": [{"status": 503, "count": 1, "endpoint": "/api/v1/instances/"}]})
    assert forbidden(call(fakevast, "GET", "/api/v1/instances/", key))
    assert fakevast.requests()[-1]["status"] == 403
    assert fakevast.ledger()["api_calls"]["GET /api/v1/instances/"] == 1
    assert vast.show_instances()  # the fault is still there for the user's call (SDK retries)
    fakevast.set_faults(
        {"http": [{"status": 503, "count": 1, "endpoint": f"/api/v0/instances/{first}/"}]}
    )
    assert call(fakevast, "GET", f"/api/v0/instances/{first}/", key)[0] == 503
    assert call(fakevast, "GET", f"/api/v0/instances/{first}/", key)[0] == 200


# -- the runtime on its own ---------------------------------------------------------------------

MAIN_ENV = {"CONTAINER_ID": "7", "CONTAINER_API_KEY": "k" * 64}


@needs_namespaces
def test_args_mode_main_process_is_pid_1_with_the_key(tmp_path: Path) -> None:
    script = "tr '\\0' '\\n' < /proc/1/environ"
    spec = ContainerSpec(
        7, "vastai/base-image", False, "/bin/sh", ["-c", script], {}, [], main_env=MAIN_ENV
    )
    instance = Container(spec, tmp_path / "instance")
    try:
        instance.start()
        assert instance.isolated
        assert wait_for(lambda: not instance.is_running())
        env = environ(instance.log_text())
        assert {name: env.get(name) for name in SCOPED} == MAIN_ENV
    finally:
        instance.destroy()


@pytest.mark.filterwarnings("ignore:fakevast:RuntimeWarning")
def test_unisolated_fallback_puts_the_key_in_the_main_process_only(
    tmp_path: Path, ssh_key: paramiko.PKey
) -> None:
    """Without namespaces there is no private PID 1: the key is in the environ of the
    instance's main process (the init script, sshd's ancestor), not of sshd or its sessions."""
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # a root sshd's privsep dir
    keys = [public_key(ssh_key)]
    spec = ContainerSpec(8, "vastai/base-image", True, None, None, {}, keys, main_env=MAIN_ENV)
    instance = Container(spec, tmp_path / "instance", isolate=False)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        instance.start()
        assert not instance.isolated and instance._proc is not None
        main = instance._proc.pid
        main_environ = environ(Path(f"/proc/{main}/environ").read_text())
        assert {name: main_environ.get(name) for name in SCOPED} == MAIN_ENV
        client.connect(
            "127.0.0.1",
            port=instance.sshd_port or 0,
            username=getpass.getuser(),
            pkey=ssh_key,
            timeout=10,
            allow_agent=False,
            look_for_keys=False,
        )
        session = environ(run(client, "env"))
        assert "PATH" in session and not set(SCOPED) & set(session)
        # The same user can read them, at the main process's pid rather than at /proc/1.
        assert environ(run(client, f"cat /proc/{main}/environ"))["CONTAINER_ID"] == "7"
    finally:
        client.close()
        instance.destroy()


def test_instances_the_fake_itself_ends_are_destroyed_by_fake(tmp_path: Path) -> None:
    market = Market(Catalog.load(), boot_seconds=0, state_root=tmp_path)
    offer_id = market.search({"limit": 1})["offers"][0]["id"]
    created = market.create(str(offer_id), {"image": "vastai/base-image", "disk": 16})
    ledger = market.ledger()["instances"]
    assert [(row["destroyed_by"], row["stopped_by"]) for row in ledger] == [(None, None)]
    market.close()  # what SIGTERM does: destroys every instance
    [row] = market.ledger()["instances"]
    assert row["id"] == created["new_contract"] and row["status"] == "destroyed"
    assert row["destroyed_by"] == "fake" and row["stopped_by"] is None
