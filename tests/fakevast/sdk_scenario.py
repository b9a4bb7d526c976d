"""A whole client session through the unmodified SDK, configured only by the environment.

Run as a script in a fresh interpreter: ``VAST_URL`` must be set before ``vastai`` is first
imported, and this is also how the oldest supported SDK (its own virtualenv) is exercised.
Needs ``VAST_URL`` and ``VAST_API_KEY``; prints one JSON report on stdout for the test to check.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from typing import Any

import requests
from vastai import VastAI

IMAGE = "vastai/base-image:cuda-12.4.1-auto"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHNjZW5hcmlvLWtleS1mb3ItZmFrZXZhc3Qtb25seQ scenario"


def wait_status(vast: VastAI, instance_id: int, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        row = vast.show_instance(instance_id)
        if row and row["actual_status"] == status:
            return row
        time.sleep(0.1)
    raise TimeoutError(f"{instance_id} never became {status}")


def main() -> None:
    vast = VastAI(raw=True, quiet=True)  # server and key from VAST_URL / VAST_API_KEY
    query = "gpu_name=RTX_4090 num_gpus>=1 reliability>0.95 geolocation in [US,CA,PL,NL]"
    offers = vast.search_offers(query=query, order="dph_total", limit=2, storage=20)
    first = vast.create_instance(
        id=offers[0]["id"],
        image=IMAGE,
        disk=20,
        label="scenario-args",
        env={"GREETING": "scenario-ok"},
        runtype="args",
        onstart_cmd="/bin/sh",
        args=["-c", 'echo "$GREETING"'],
        cancel_unavail=True,
    )
    second = vast.create_instance(
        id=offers[1]["id"], image=IMAGE, disk=20, label="scenario-ssh", runtype="ssh_proxy"
    )
    args_id, ssh_id = first["new_contract"], second["new_contract"]
    attached = vast.attach_ssh(ssh_id, KEY)
    account_key = vast.create_ssh_key(KEY)
    labelled = vast.label_instance(ssh_id, "scenario-ssh-2")
    wait_status(vast, args_id, "exited")
    ssh_row = wait_status(vast, ssh_id, "running")
    listed = vast.show_instances()
    logs = vast.logs(args_id, tail="100")
    destroyed = [vast.destroy_instance(i) for i in (args_id, ssh_id)]
    try:
        vast.destroy_instance(args_id)
        second_destroy = None
    except requests.HTTPError as error:
        second_destroy = [error.response.status_code, error.response.json()]
    report = {
        "version": importlib.metadata.version("vastai"),
        "offers": [[o["id"], o["dph_total"], o["datacenter"]] for o in offers],
        "created": [first, second],
        "attached": attached,
        "account_key": account_key,
        "labelled": labelled,
        "ssh_row": {k: ssh_row[k] for k in ("ssh_host", "ssh_port", "public_ipaddr", "label")},
        "listed": sorted([r["id"], r["label"], r["extra_env"]] for r in listed),
        "logs": logs,
        "destroyed": destroyed,
        "after_destroy": vast.show_instance(args_id),
        "second_destroy": second_destroy,
        "user_keys": sorted(vast.show_user()),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
