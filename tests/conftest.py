"""Shared fixtures: a fake Vast.ai marketplace per test that must end with nothing rented."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from tests.fakevast.harness import FakeVast


def _stop_checked(fakes: list[FakeVast]) -> None:
    """Stop every fake; fail if a test left an instance running in any of them."""
    leftovers = {}
    for fake in fakes:
        try:
            alive = fake.alive_instances()
        finally:
            fake.stop()
        if alive:
            leftovers[fake.url] = [row["id"] for row in alive]
    assert not leftovers, f"instances left running at teardown: {leftovers}"


# These fixtures serve the tests about something else (faults, SSH, staging, teardown...):
# they start the fake without Vast.ai's rate limits (--no-rate-limits), which are on by
# default everywhere else. A test about the limits, or about throughput, teardown, caps or
# cost under them, passes ``rate_limits=True`` to the factory or starts its own FakeVast.
UNLIMITED = {"rate_limits": False}


@pytest.fixture
def fakevast() -> Iterator[FakeVast]:
    """A fake marketplace with instant boots (--boot-seconds 0) and no rate limits."""
    fake = FakeVast(boot_seconds=0, **UNLIMITED)
    yield fake
    _stop_checked([fake])


@pytest.fixture
def fakevast_factory() -> Iterator[Callable[..., FakeVast]]:
    """Start fakes with custom settings: ``fakevast_factory(boot_seconds=2, offers=path)``;
    without rate limits unless the caller passes ``rate_limits=``."""
    started: list[FakeVast] = []

    def start(**kwargs: Any) -> FakeVast:
        fake = FakeVast(**{**UNLIMITED, **kwargs})
        started.append(fake)
        return fake

    yield start
    _stop_checked(started)


LEAK_TRIPWIRE = Path.home() / ".instance-token"  # tests.workflows.INSTANCE_TOKEN's file


@pytest.fixture(scope="session", autouse=True)
def instances_keep_to_themselves() -> Iterator[None]:
    """A job's ``$HOME`` is its instance's own: were an instance ever to run on this machine's
    filesystem (the fake unisolated), its files would land in the real home and every later
    instance would see them (two instances would look like one)."""
    assert not LEAK_TRIPWIRE.exists(), f"{LEAK_TRIPWIRE} exists before the tests: remove it"
    yield
    assert not LEAK_TRIPWIRE.exists(), f"an instance wrote {LEAK_TRIPWIRE} on this machine"


@pytest.fixture(scope="session")
def ssh_key() -> paramiko.ECDSAKey:
    """A throwaway client key; its public half is what tests attach to instances."""
    return paramiko.ECDSAKey.generate()
