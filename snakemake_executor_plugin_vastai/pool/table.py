"""Every instance of the run in one table that owns the lock and allows only legal moves.

Why a table with a written-down transition map: job threads, the reaper, the status loop and
teardown all change instances at once. If any state could be set from any other, a teardown's
``destroying`` could be overwritten by a job thread's ``busy`` and an instance would escape
teardown while it bills. Every change goes through :meth:`InstanceTable.move` under the one
lock, and a move the map does not allow raises :class:`IllegalTransition` (a bug).

The table also answers what the caps need: how many instances count (a rent counts from the
moment it is reserved, before the search), and what they cost per hour.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from snakemake_executor_plugin_vastai.base.errors import PluginBug, VastaiError
from snakemake_executor_plugin_vastai.pool.states import BILLING, ENTRY, TRANSITIONS, State

if TYPE_CHECKING:  # instance.py imports only the states, so this is no cycle
    from snakemake_executor_plugin_vastai.pool.instance import Instance


class IllegalTransition(PluginBug):
    """A move the transition map forbids: a bug in the plugin, never a user error."""


class Cancelled(VastaiError):
    """The run is shutting down: the job was cancelled, it did not fail."""


class InstanceTable:
    """The run's instances and the one lock (a condition) that guards all of them, and
    whether the run is closing: once it is, no new rent may start."""

    def __init__(self) -> None:
        self.changed = threading.Condition(threading.RLock())
        self._instances: list[Instance] = []
        self.closing = False

    def close(self) -> None:
        """Teardown has begun: every waiter wakes, and no rent starts from now on."""
        with self.changed:
            self.closing = True
            self.changed.notify_all()

    def check_open(self) -> None:
        if self.closing:
            raise Cancelled("the run is shutting down")

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self.changed:
            yield

    def add(self, instance: Instance) -> None:
        with self.changed:
            if instance.state not in ENTRY:
                raise IllegalTransition(f"{instance.label} enters the table as {instance.state}")
            self._instances.append(instance)
            self.changed.notify_all()

    def move(self, instance: Instance, to: State) -> None:
        """The only way to change an instance's state."""
        with self.changed:
            if to not in TRANSITIONS[instance.state]:
                raise IllegalTransition(
                    f"{instance.label}: {instance.state.value} -> {to.value} is not allowed"
                )
            instance.state = to
            self.changed.notify_all()

    def drop_reservation(self, instance: Instance) -> None:
        """Forget a reservation that rented nothing (nothing to bill, nothing to report)."""
        with self.changed:
            self.move(instance, State.GONE)
            self._instances.remove(instance)

    def wait(self, timeout: float) -> None:
        """Sleep until something in the table changes (or the timeout), lock held."""
        with self.changed:
            self.changed.wait(timeout)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def all(self) -> list[Instance]:
        with self.changed:
            return list(self._instances)

    def in_states(self, states: frozenset[State]) -> list[Instance]:
        with self.changed:
            return [i for i in self._instances if i.state in states]

    def counted(self) -> list[Instance]:
        """What the caps count: everything that bills or may bill, reservations included.
        An unknown create stops counting once list rounds have missed it long enough."""
        with self.changed:
            return [
                i
                for i in self._instances
                if i.state in BILLING and not (i.state is State.UNKNOWN and i.presumed_absent)
            ]
