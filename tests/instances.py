"""Rent a real fake instance through the plugin's own ``Marketplace`` and log in to it.

Why a helper of its own: staging and bootstrap need a real SSH session on a real instance, and
going through the plugin's API layer (rent, attach key, show, destroy) instead of the raw SDK
also exercises that layer the way a run does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import paramiko

from snakemake_executor_plugin_vastai.market.marketplace import (
    InstanceInfo,
    Marketplace,
    RetryPolicy,
)
from snakemake_executor_plugin_vastai.pool.instance import ssh_endpoints
from snakemake_executor_plugin_vastai.remote.bootstrap import ONSTART_SCRIPT
from snakemake_executor_plugin_vastai.remote.ssh import RemoteHost
from tests.fakevast.clients import DEFAULT_IMAGE, public_key
from tests.fakevast.harness import FakeVast

# Backoff measured in tens of milliseconds, so a retried call costs the test almost nothing.
FAST_RETRY = RetryPolicy(attempts=4, first_delay=0.02, factor=2.0, max_delay=0.2)
# Offers with a direct port, so both endpoints (direct and proxy) exist.
QUERY = "num_gpus=1 direct_port_count>0"
DISK_GB = 16.0


def market_for(fake: FakeVast, retry: RetryPolicy = FAST_RETRY) -> Marketplace:
    return Marketplace(fake.api_key, fake.url, retry)


def rent(market: Marketplace, label: str, image: str = DEFAULT_IMAGE) -> int:
    """Rent the cheapest matching offer as a run would; returns the instance id."""
    offer = market.search(QUERY, "dph_total", DISK_GB, limit=1)[0]
    return market.rent(offer.id, image=image, disk_gb=DISK_GB, label=label, onstart=ONSTART_SCRIPT)


def wait_for(
    market: Marketplace,
    instance_id: int,
    ready: Callable[[InstanceInfo], object],
    timeout: float = 30.0,
) -> InstanceInfo:
    """Poll ``show`` until ``ready(row)`` holds; returns that row."""
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        info = market.show(instance_id)
        if info is not None and ready(info):
            return info
        time.sleep(0.05)
    raise TimeoutError(f"instance {instance_id} not ready after {timeout} s: {info}")


def is_running(info: InstanceInfo) -> bool:
    return info.actual_status == "running"


@dataclass(frozen=True)
class LoggedIn:
    market: Marketplace
    info: InstanceInfo
    host: RemoteHost


@contextlib.contextmanager
def logged_in(
    fake: FakeVast, key: paramiko.PKey, image: str = DEFAULT_IMAGE, label: str = "test:login"
) -> Iterator[LoggedIn]:
    """A running instance with ``key`` attached and a connected ``RemoteHost``; destroyed after."""
    market = market_for(fake)
    instance_id = rent(market, label, image)
    try:
        market.attach_key(instance_id, public_key(key))
        info = wait_for(market, instance_id, is_running)
        host = RemoteHost(f"instance {instance_id}", ssh_endpoints(info), key)
        host.connect(time.monotonic() + 30)
        try:
            yield LoggedIn(market, info, host)
        finally:
            host.close()
    finally:
        market.destroy(instance_id)
