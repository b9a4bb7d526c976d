"""The `proxy_down` fault: an instance whose proxy tunnel (ssh_host:ssh_port) never comes up,
while its direct port works; a reboot through the API brings the proxy up. Real HTTP and SSH."""

from __future__ import annotations

import urllib.error
from typing import Any

import paramiko
import pytest
import requests
from vastai import VastAI

from tests.fakevast.clients import public_key, rent, run, sdk, ssh_login, wait_status
from tests.fakevast.harness import FakeVast

NO_DIRECT_PORTS = "gpu_name=RTX_4090 num_gpus=1 direct_port_count=0"
DIRECT_PORTS = "gpu_name=RTX_4090 num_gpus=1 direct_port_count>=1"


@pytest.fixture
def vast(fakevast: FakeVast) -> VastAI:
    return sdk(fakevast)


def login_fails(host: str, port: int, key: paramiko.PKey) -> None:
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):
        ssh_login(host, port, key, timeout=3).close()


def login_works(host: str, port: int, key: paramiko.PKey) -> None:
    client = ssh_login(host, port, key)
    try:
        assert run(client, "echo in") == "in\n"
    finally:
        client.close()


def direct_port(row: dict[str, Any]) -> int:
    return int(row["ports"]["22/tcp"][0]["HostPort"])


@pytest.mark.parametrize("scope", ["offers", "next_creates"])
def test_proxy_down_from_create_is_healed_by_a_reboot(
    fakevast: FakeVast, vast: VastAI, ssh_key: paramiko.PKey, scope: str
) -> None:
    offer = vast.search_offers(query=NO_DIRECT_PORTS, order="dph_total", limit=1)[0]
    declared = {"proxy_down": True}
    fakevast.set_faults({scope: {str(offer["id"]): declared} if scope == "offers" else declared})
    instance_id = rent(vast, query=NO_DIRECT_PORTS)
    try:
        vast.attach_ssh(instance_id, public_key(ssh_key))
        row = wait_status(vast, instance_id, "running")
        assert row["ports"] == {} and row["ssh_port"]
        login_fails(row["ssh_host"], row["ssh_port"], ssh_key)
        login_fails(row["ssh_host"], row["ssh_port"], ssh_key)  # not a one-shot
        assert vast.show_instance(instance_id)["actual_status"] == "running"

        assert vast.reboot_instance(id=instance_id) == {"success": True}
        after = wait_status(vast, instance_id, "running", timeout=10)
        assert (after["ssh_host"], after["ssh_port"]) == (row["ssh_host"], row["ssh_port"])
        login_works(row["ssh_host"], row["ssh_port"], ssh_key)
    finally:
        vast.destroy_instance(instance_id)


def test_proxy_down_on_a_live_instance_leaves_the_direct_port(
    fakevast: FakeVast, vast: VastAI, ssh_key: paramiko.PKey
) -> None:
    instance_id = rent(vast, query=DIRECT_PORTS, runtype="ssh_direc ssh_proxy")
    try:
        vast.attach_ssh(instance_id, public_key(ssh_key))
        row = wait_status(vast, instance_id, "running")
        host, proxy, direct = row["ssh_host"], row["ssh_port"], direct_port(row)
        through_proxy = ssh_login(host, proxy, ssh_key)
        through_direct = ssh_login(host, direct, ssh_key)

        fakevast.set_faults({"instances": {str(instance_id): {"proxy_down": True}}})
        # The proxy's live sessions drop with the tunnel; the direct one stays.
        with pytest.raises((paramiko.SSHException, EOFError, OSError)):
            run(through_proxy, "true", timeout=5)
        through_proxy.close()
        assert run(through_direct, "echo direct") == "direct\n"
        login_fails(host, proxy, ssh_key)
        login_works(host, direct, ssh_key)

        # A raw reboot request, as the SDK sends it, brings the proxy up.
        answer = requests.put(
            f"{fakevast.url}/api/v0/instances/reboot/{instance_id}/",
            json={},
            headers={"Authorization": f"Bearer {fakevast.api_key}"},
            timeout=10,
        )
        assert answer.status_code == 200 and answer.json() == {"success": True}
        wait_status(vast, instance_id, "running", timeout=10)
        login_works(host, proxy, ssh_key)
        login_works(host, direct, ssh_key)
        through_direct.close()
    finally:
        vast.destroy_instance(instance_id)


def test_proxy_down_is_validated_and_cleared_with_the_faults(
    fakevast: FakeVast, vast: VastAI, ssh_key: paramiko.PKey
) -> None:
    with pytest.raises(urllib.error.HTTPError) as rejected:
        fakevast.set_faults({"next_creates": {"proxy_down": "yes"}})
    assert rejected.value.code == 400
    fakevast.set_faults({"next_creates": {"proxy_down": True}})
    assert fakevast.faults()["next_creates"]["proxy_down"] is True
    instance_id = rent(vast, query=NO_DIRECT_PORTS)
    try:
        vast.attach_ssh(instance_id, public_key(ssh_key))
        row = wait_status(vast, instance_id, "running")
        login_fails(row["ssh_host"], row["ssh_port"], ssh_key)
        fakevast.clear_faults()  # DELETE /_fake/faults brings the tunnel up too
        login_works(row["ssh_host"], row["ssh_port"], ssh_key)
    finally:
        vast.destroy_instance(instance_id)
