"""Client-side helpers for tests that drive the fake: SDK client, status waits, SSH logins."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import paramiko
import requests
from vastai import VastAI

from .harness import FakeVast

DEFAULT_IMAGE = "vastai/base-image:cuda-12.4.1-auto"
SHOW_INTERVAL = 2.0  # GET /instances/{id}/ under the rate limits (limits.py)


def sdk(fake: FakeVast, retry: int = 3) -> VastAI:
    return VastAI(api_key=fake.api_key, server_url=fake.url, retry=retry, raw=True, quiet=True)


def public_key(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()} fakevast-test"


def rent(
    vast: VastAI, query: str = "gpu_name=RTX_4090 num_gpus=1", runtype: str = "ssh_proxy", **kw: Any
) -> int:
    """Create an instance on the cheapest offer matching `query`; returns its id."""
    offer = vast.search_offers(query=query, order="dph_total", limit=1)[0]
    kw.setdefault("image", DEFAULT_IMAGE)
    created = vast.create_instance(id=offer["id"], disk=16, runtype=runtype, **kw)
    assert created["success"], created
    return int(created["new_contract"])


def wait_status(vast: VastAI, instance_id: int, status: str, timeout: float = 20) -> dict:
    """Poll show_instance until actual_status is `status`; returns that row. Polls every
    0.1 s; a fake with rate limits refuses that (429), which only slows the poll down to
    the show endpoint's interval."""
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        try:
            row = vast.show_instance(instance_id)
        except requests.HTTPError as error:
            if error.response is None or error.response.status_code != 429:
                raise
            time.sleep(SHOW_INTERVAL)
            continue
        if row is not None and row["actual_status"] == status:
            return row
        time.sleep(0.1)
    raise TimeoutError(f"instance {instance_id} not {status} after {timeout} s: {row}")


def ssh_login(host: str, port: int, key: paramiko.PKey, timeout: float = 10) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(
        host,
        port=port,
        username="root",
        pkey=key,
        timeout=timeout,
        banner_timeout=timeout,
        auth_timeout=timeout,
        allow_agent=False,
        look_for_keys=False,
    )
    return client


def run(client: paramiko.SSHClient, command: str, timeout: float = 30) -> str:
    """Run `command`; its stdout, or AssertionError with stderr on a non-zero exit. A
    connection that dies while the command runs raises SSHException (paramiko itself only
    reports exit status -1 then)."""
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode()
    status = stdout.channel.recv_exit_status()
    transport = client.get_transport()
    if status == -1 and (transport is None or not transport.is_active()):
        raise paramiko.SSHException(f"{command!r}: the connection died")
    assert status == 0, f"{command!r} exited {status}: {stderr.read().decode()}"
    return out


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
