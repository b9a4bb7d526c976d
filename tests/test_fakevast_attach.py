"""The ``drop_attach`` fault: ``POST /api/v0/instances/{id}/ssh/`` answers success but the key
never reaches the instance, as the earlier plugin's authors found on real Vast.ai instances; a
key the onstart script writes into ``/root/.ssh/authorized_keys`` still gets in. Real HTTP and
SSH, no mocks."""

from __future__ import annotations

import shlex
import time
import urllib.error
from pathlib import Path

import paramiko
import pytest
from vastai import VastAI

from tests.fakevast import container as container_module
from tests.fakevast.clients import public_key, rent, run, sdk, ssh_login, wait_status
from tests.fakevast.harness import FakeVast

pytestmark = [
    pytest.mark.skipif(
        not Path("/usr/sbin/sshd").exists(), reason="needs OpenSSH's sshd at /usr/sbin/sshd"
    ),
    pytest.mark.skipif(
        not container_module.namespaces_available(), reason="needs root to create namespaces"
    ),
]

ATTACHED = {"success": True, "msg": "SSH key attached successfully"}


@pytest.fixture
def vast(fakevast: FakeVast) -> VastAI:
    return sdk(fakevast)


def new_key() -> paramiko.PKey:
    return paramiko.ECDSAKey.generate()


def login(row: dict, key: paramiko.PKey) -> paramiko.SSHClient:
    return ssh_login(row["ssh_host"], row["ssh_port"], key)


def refused(row: dict, key: paramiko.PKey) -> bool:
    try:
        login(row, key).close()
    except paramiko.AuthenticationException:
        return True
    return False


def login_eventually(row: dict, key: paramiko.PKey, timeout: float = 15) -> paramiko.SSHClient:
    """Log in, retrying while the key is refused (the onstart script may not have run yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return login(row, key)
        except paramiko.AuthenticationException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def onstart_installing(key: paramiko.PKey) -> str:
    """An onstart script that installs `key` for root, as the earlier plugin did."""
    line = shlex.quote(public_key(key))
    return (
        "mkdir -p /root/.ssh && chmod 700 /root/.ssh\n"
        f"echo {line} >> /root/.ssh/authorized_keys\n"
        "chmod 600 /root/.ssh/authorized_keys\n"
        'echo "$(id -u) $HOME" > /root/onstart-ran\n'
    )


def test_dropped_attach_answers_success_but_the_key_never_works(
    fakevast: FakeVast, vast: VastAI
) -> None:
    fakevast.set_faults({"next_creates": {"drop_attach": True}})
    dropped, account = new_key(), new_key()
    assert vast.create_ssh_key(public_key(account))["success"] is True
    instance_id = rent(vast)
    assert vast.show_instance(instance_id)["actual_status"] in (None, "loading")
    assert vast.attach_ssh(instance_id, public_key(dropped)) == ATTACHED  # while loading
    row = wait_status(vast, instance_id, "running")
    assert vast.attach_ssh(instance_id, public_key(dropped)) == ATTACHED  # and when live
    assert refused(row, dropped)

    # An account key (given at create time another way) is unaffected.
    client = login(row, account)
    keys = run(client, "cat /root/.ssh/authorized_keys")
    assert public_key(account) in keys and dropped.get_base64() not in keys
    client.close()

    # The fault was for the next create only: the following instance takes attaches again.
    healthy = rent(vast)
    assert vast.attach_ssh(healthy, public_key(dropped)) == ATTACHED
    login(wait_status(vast, healthy, "running"), dropped).close()
    for doomed in (instance_id, healthy):
        vast.destroy_instance(doomed)


def test_a_key_the_onstart_script_writes_gets_in(fakevast: FakeVast, vast: VastAI) -> None:
    offer = vast.search_offers(query="gpu_name=RTX_4090 num_gpus=1", order="dph_total", limit=1)
    fakevast.set_faults({"offers": {str(offer[0]["id"]): {"drop_attach": True}}})
    key = new_key()
    instance_id = rent(vast, onstart_cmd=onstart_installing(key))
    assert vast.attach_ssh(instance_id, public_key(key)) == ATTACHED  # dropped
    row = wait_status(vast, instance_id, "running")

    client = login_eventually(row, key)
    assert run(client, "cat /root/onstart-ran") == "0 /root\n"  # root, HOME=/root
    assert run(client, "id -un") == "root\n"
    # Only the onstart script's line: the attach put nothing there.
    keys = run(client, "cat /root/.ssh/authorized_keys").splitlines()
    assert keys.count(public_key(key)) == 1 and len(keys) == 1
    assert run(client, "stat -c %a /root/.ssh /root/.ssh/authorized_keys") == "700\n600\n"
    assert fakevast.faults()["offers"][str(offer[0]["id"])]["drop_attach"] is True
    client.close()
    vast.destroy_instance(instance_id)


def test_drop_attach_on_a_live_instance_until_cleared(fakevast: FakeVast, vast: VastAI) -> None:
    first, second, third = new_key(), new_key(), new_key()
    instance_id = rent(vast)
    assert vast.attach_ssh(instance_id, public_key(first)) == ATTACHED
    row = wait_status(vast, instance_id, "running")
    login(row, first).close()  # without the fault: in force

    fakevast.set_faults({"instances": {str(instance_id): {"drop_attach": True}}})
    assert vast.attach_ssh(instance_id, public_key(second)) == ATTACHED
    assert refused(row, second)
    login(row, first).close()  # keys attached before stay

    fakevast.clear_faults()
    assert vast.attach_ssh(instance_id, public_key(third)) == ATTACHED
    login(row, third).close()
    assert refused(row, second)  # a dropped key stays dropped
    vast.destroy_instance(instance_id)


def test_drop_attach_is_validated(fakevast: FakeVast) -> None:
    for bad in (
        {"next_creates": {"drop_attach": "yes"}},
        {"offers": {"9210001": {"drop_attach": 1}}},
    ):
        with pytest.raises(urllib.error.HTTPError) as rejected:
            fakevast.set_faults(bad)
        assert rejected.value.code == 400
    fakevast.set_faults({"next_creates": {"drop_attach": True, "count": 2}})
    assert fakevast.faults()["next_creates"]["drop_attach"] is True
