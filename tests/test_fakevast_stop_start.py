"""The fake's stop tier, through the unmodified SDK and real SSH: a stop halts the container
and keeps its disk, a start brings it back on that disk once its GPU is free, and a stopped
instance pays its storage only (vast-api.md §4, §10; docs.vast.ai, "vastai start instance").
"""

from __future__ import annotations

import time
import urllib.error
from collections.abc import Callable
from typing import Any

import paramiko
import pytest
import requests
from vastai import VastAI

from tests.fakevast.clients import public_key, rent, run, sdk, ssh_login, wait_status
from tests.fakevast.harness import FakeVast
from tests.fakevast.instance import RESTART_MSG, SCHEDULING_MSG

Factory = Callable[..., FakeVast]
QUERY = "gpu_name=RTX_4090 num_gpus=1"
# The onstart script logs each start of the container, and leaves a process behind.
ONSTART = "echo started >> /root/starts.log; setsid sleep 4321 > /dev/null 2>&1 &"


def ledger_row(fake: FakeVast, instance_id: int) -> dict[str, Any]:
    return next(row for row in fake.ledger()["instances"] if row["id"] == instance_id)


def halted(fake: FakeVast, instance_id: int) -> dict[str, Any]:
    """Wait until its container is down and its GPU paid no longer; that ledger row."""
    fake.wait_for(lambda: not ledger_row(fake, instance_id)["gpu_held"], timeout=10)
    return ledger_row(fake, instance_id)


def login(vast: VastAI, instance_id: int, key: paramiko.PKey) -> paramiko.SSHClient:
    row = vast.show_instance(instance_id)
    return ssh_login(row["ssh_host"], row["ssh_port"], key)


def states(row: dict[str, Any]) -> tuple[Any, ...]:
    """actual_status, intended_status, cur_state, next_state."""
    return tuple(
        row[key] for key in ("actual_status", "intended_status", "cur_state", "next_state")
    )


def finish(fake: FakeVast, vast: VastAI, *instance_ids: int) -> None:
    for instance_id in instance_ids:
        assert vast.destroy_instance(instance_id)["success"] is True
    assert fake.alive_instances() == []


def test_a_start_brings_it_back_on_its_disk_with_the_onstart_run_again(
    fakevast_factory: Factory, ssh_key: paramiko.PKey
) -> None:
    fake = fakevast_factory(boot_seconds=2.0, restart_seconds=0.2)
    vast = sdk(fake)
    instance_id = rent(vast, QUERY, onstart_cmd=ONSTART)
    vast.attach_ssh(instance_id, public_key(ssh_key))
    wait_status(vast, instance_id, "running")
    client = login(vast, instance_id, ssh_key)
    run(client, "echo kept > /root/kept.txt")
    fake.wait_for(lambda: "sleep 4321" in run(client, "ps -eo args"), timeout=5)
    first_port = vast.show_instance(instance_id)["ssh_port"]

    assert vast.stop_instance(instance_id)["success"] is True
    assert set(states(vast.show_instance(instance_id))) == {"stopped"}
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):
        run(client, "true", timeout=5)
    halted(fake, instance_id)

    asked = time.time()
    assert vast.start_instance(instance_id)["success"] is True
    waiting = vast.show_instance(instance_id)
    assert states(waiting) == ("stopped", "running", "stopped", "running")
    assert waiting["status_msg"] == SCHEDULING_MSG
    loading = wait_status(vast, instance_id, "loading", timeout=5)
    assert loading["status_msg"] == RESTART_MSG and loading["cur_state"] == "running"
    running = wait_status(vast, instance_id, "running", timeout=10)
    row = ledger_row(fake, instance_id)
    first_boot = row["running_at"] - row["created_at"]
    assert first_boot >= 2.0  # it pulled the image
    assert 0.2 <= row["restarted_at"] - asked < first_boot  # the restart did not
    assert running["ssh_port"] != first_port  # new endpoints: read them again after a start

    client = login(vast, instance_id, ssh_key)
    assert run(client, "cat /root/kept.txt") == "kept\n"
    fake.wait_for(lambda: run(client, "cat /root/starts.log") == "started\n" * 2, timeout=5)
    processes = run(client, "ps -eo args")
    assert processes.count("sleep 4321") == 1  # the new start's; the old run's died
    client.close()
    finish(fake, vast, instance_id)


def test_a_stopped_instance_pays_its_storage_only(fakevast_factory: Factory) -> None:
    fake = fakevast_factory(restart_seconds=0.2)
    vast = sdk(fake)
    instance_id = rent(vast, QUERY)
    wait_status(vast, instance_id, "running")
    time.sleep(0.5)
    running = ledger_row(fake, instance_id)
    assert running["gpu_held"] is True and running["gpu_cost"] > 0
    assert running["dph_total"] == pytest.approx(
        running["dph_base"] + running["storage_total_cost"]
    )

    stopped_at = time.time()
    vast.stop_instance(instance_id)
    before = halted(fake, instance_id)
    time.sleep(0.5)
    after = ledger_row(fake, instance_id)
    assert after["gpu_cost"] == before["gpu_cost"]  # GPU $ frozen
    assert after["gpu_cost"] >= before["dph_base"] * (stopped_at - before["created_at"]) / 3600
    assert after["disk_cost"] > before["disk_cost"]  # storage $ grows
    grown = after["disk_cost"] - before["disk_cost"]
    assert grown >= before["storage_total_cost"] * 0.5 / 3600
    assert after["cost"] == pytest.approx(
        after["gpu_cost"] + after["disk_cost"] + after["bandwidth_cost"]
    )
    assert vast.show_user()["balance"] == pytest.approx(100 - after["cost"], abs=1e-5)

    vast.start_instance(instance_id)
    wait_status(vast, instance_id, "running")
    fake.wait_for(lambda: ledger_row(fake, instance_id)["gpu_cost"] > after["gpu_cost"], 5)
    assert ledger_row(fake, instance_id)["gpu_held"] is True  # full dph again
    finish(fake, vast, instance_id)
    ended = ledger_row(fake, instance_id)
    time.sleep(0.2)
    assert ledger_row(fake, instance_id) == ended  # nothing billed after the destroy


def test_a_start_waits_for_as_long_as_another_renter_holds_the_gpu(
    fakevast_factory: Factory,
) -> None:
    fake = fakevast_factory(restart_seconds=0.2)
    vast = sdk(fake)
    fake.set_faults({"gpu_taken_while_stopped": {"probability": 1.0}})  # for good
    assert fake.faults()["gpu_taken_while_stopped"] == {"probability": 1.0, "for_seconds": None}
    stuck = rent(vast, QUERY)
    wait_status(vast, stuck, "running")
    offer_id = ledger_row(fake, stuck)["offer_id"]
    vast.stop_instance(stuck)
    frozen = halted(fake, stuck)["gpu_cost"]
    vast.start_instance(stuck)
    for _ in range(10):
        row = vast.show_instance(stuck)
        assert states(row) == ("stopped", "running", "stopped", "running")
        assert row["status_msg"] == SCHEDULING_MSG and row["ports"] == {}
        time.sleep(0.15)
    assert ledger_row(fake, stuck)["gpu_cost"] == frozen
    assert offer_id not in {offer["id"] for offer in vast.search_offers(query=QUERY)}

    fake.set_faults({"gpu_taken_while_stopped": {"probability": 1.0, "for_seconds": 1.0}})
    later = rent(vast, QUERY)  # on another offer: this one's GPU is taken
    wait_status(vast, later, "running")
    vast.stop_instance(later)
    halted(fake, later)
    asked = time.time()
    vast.start_instance(later)
    wait_status(vast, later, "running", timeout=10)
    assert ledger_row(fake, later)["restarted_at"] - asked >= 1.0
    assert vast.show_instance(stuck)["actual_status"] == "stopped"  # still waiting
    finish(fake, vast, stuck, later)


def test_our_own_create_on_the_freed_gpu_holds_the_start_back(fakevast_factory: Factory) -> None:
    fake = fakevast_factory(restart_seconds=0.2)
    vast = sdk(fake)
    first = rent(vast, QUERY)
    wait_status(vast, first, "running")
    offer_id = ledger_row(fake, first)["offer_id"]
    assert offer_id not in {offer["id"] for offer in vast.search_offers(query=QUERY)}
    vast.stop_instance(first)
    halted(fake, first)
    assert offer_id in {offer["id"] for offer in vast.search_offers(query=QUERY)}
    second = vast.create_instance(id=offer_id, image="vastai/x", disk=10)["new_contract"]

    vast.start_instance(first)
    time.sleep(1.0)
    assert vast.show_instance(first)["status_msg"] == SCHEDULING_MSG
    vast.destroy_instance(second)
    wait_status(vast, first, "running", timeout=10)
    finish(fake, vast, first)


def test_an_outbid_instance_does_not_start(fakevast_factory: Factory) -> None:
    fake = fakevast_factory(restart_seconds=0.2)
    vast = sdk(fake)
    instance_id = rent(vast, QUERY)
    wait_status(vast, instance_id, "running")
    fake.set_faults({"instances": {str(instance_id): {"stopped": True}}})
    halted(fake, instance_id)
    vast.start_instance(instance_id)
    time.sleep(1.0)
    row = vast.show_instance(instance_id)
    assert states(row) == ("stopped", "running", "stopped", "running")
    assert ledger_row(fake, instance_id)["stopped_by"] == "fake"
    finish(fake, vast, instance_id)


def test_a_start_before_the_first_boot_boots_it_afresh(fakevast_factory: Factory) -> None:
    fake = fakevast_factory(boot_seconds=1.0)
    vast = sdk(fake)
    instance_id = rent(vast, QUERY)
    vast.stop_instance(instance_id)
    assert ledger_row(fake, instance_id)["gpu_held"] is False  # nothing to halt
    vast.start_instance(instance_id)
    loading = wait_status(vast, instance_id, "loading", timeout=5)
    assert loading["status_msg"].startswith("Pulling image")
    wait_status(vast, instance_id, "running", timeout=10)
    assert ledger_row(fake, instance_id)["restarted_at"] is None  # its first run
    finish(fake, vast, instance_id)


def test_stopped_instances_can_be_destroyed(fakevast_factory: Factory) -> None:
    fake = fakevast_factory()
    vast = sdk(fake)
    stopped, halting = rent(vast, QUERY), rent(vast, QUERY)
    for instance_id in (stopped, halting):
        wait_status(vast, instance_id, "running")
    vast.stop_instance(stopped)
    halted(fake, stopped)
    vast.stop_instance(halting)  # and destroyed before its `docker stop` is due
    finish(fake, vast, halting, stopped)
    for instance_id in (halting, stopped):
        assert vast.show_instance(instance_id) is None
        assert ledger_row(fake, instance_id)["status"] == "destroyed"


def test_start_and_stop_live_by_the_manage_limit(fakevast_factory: Factory) -> None:
    """One per 1.0 s (vast-api.md §10: "manage / label / stop"), a refused start does nothing."""
    fake = fakevast_factory(rate_limits=True)
    fake.set_limits(freeze=True)
    vast = sdk(fake)
    instance_id = rent(vast, QUERY)
    vast.stop_instance(instance_id)
    with pytest.raises(requests.HTTPError) as refused:
        vast.start_instance(instance_id)
    assert refused.value.response.status_code == 429
    assert refused.value.response.text == "API requests too frequent: endpoint threshold=1.0"
    assert ledger_row(fake, instance_id)["status"] == "stopped"
    fake.set_limits(advance_seconds=1.0)
    assert vast.start_instance(instance_id)["success"] is True
    assert fake.ledger()["rate_limited"]["PUT /api/v0/instances/{id}/"] == 3  # SDK retries
    finish(fake, vast, instance_id)


@pytest.mark.parametrize(
    "bad",
    [
        {"gpu_taken_while_stopped": {"probability": 0}},
        {"gpu_taken_while_stopped": {"for_seconds": -1}},
        {"gpu_taken_while_stopped": {"forever": True}},
        {"restart_seconds": -1},
    ],
)
def test_stop_tier_settings_are_validated(fakevast: FakeVast, bad: dict[str, Any]) -> None:
    with pytest.raises(urllib.error.HTTPError) as rejected:
        fakevast.set_faults(bad)
    assert rejected.value.code == 400
    fakevast.set_faults({"restart_seconds": 0.5, "gpu_taken_while_stopped": {}})
    fakevast.clear_faults()
    cleared = fakevast.faults()
    assert cleared["restart_seconds"] is None and cleared["gpu_taken_while_stopped"] is None
