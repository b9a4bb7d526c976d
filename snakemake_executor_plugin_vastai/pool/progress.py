"""The progress lines about instances: their names, boot progress, and the running total of
dollars.

Why one module: these lines come from several threads (the reaper's list rounds, job
threads, the spend ticker) and each kind has its own rule against saying the same thing
twice; kept here, those rules stay out of the code that rents, boots and destroys. They
are said through ``report``, like every progress line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from snakemake_executor_plugin_vastai.base.report import count, say
from snakemake_executor_plugin_vastai.pool.states import State

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from snakemake_executor_plugin_vastai.pool.instance import Instance

BOOT_PROGRESS_SECONDS = 15.0  # at most one boot line per instance this often
SPEND_TICK_SECONDS = 60.0  # the running total of dollars, while instances are alive
STATUS_CHARS = 100  # Vast's status messages can be long (a pull's progress): cut here


def short_name(instance: Instance) -> str:
    """The instance as progress lines name it (the "Rented" line ties the id to its offer)."""
    return f"instance {instance.instance_id}"


def boot_status(instance: Instance, redact: Callable[[str], str]) -> str:
    """Vast's own word on a booting instance: its status and status message, on one line
    (redacted before it is cut, so no part of a secret survives)."""
    info = instance.info
    if info is None:
        return "not listed by Vast.ai yet"
    message = re.sub(r"\s+", " ", redact(info.status_msg)).strip()
    if len(message) > STATUS_CHARS:
        message = message[: STATUS_CHARS - 1] + "…"
    status = info.actual_status or "waiting for its host"
    text = f"{status}, {message}" if message else status
    return f"{text}; logging in" if instance.booted() else text


@dataclass
class BootProgress:
    """Boot lines: one per instance every ``interval`` while it boots, none for a boot
    shorter than that (its "Rented" and "booted" lines say enough)."""

    redact: Callable[[str], str]
    interval: float = BOOT_PROGRESS_SECONDS
    _said_at: dict[str, float] = field(default_factory=dict)  # label -> last line's time

    def observe(self, instance: Instance, now: float) -> None:
        """After a list round, for an instance still booting."""
        began = instance.boot_began
        last = max(self._said_at.get(instance.label, began), began)
        if now - last < self.interval:
            return
        self._said_at[instance.label] = now
        status = boot_status(instance, self.redact)
        elapsed = now - began
        say("Instance %s still booting after %.0f s: %s", instance.instance_id, elapsed, status)


@dataclass(frozen=True)
class Spend:
    """What the running total says; a line only when it differs from the last one."""

    alive: int
    dph: float
    dollars: float

    @classmethod
    def of(cls, instances: Iterable[Instance], dollars: float) -> Spend:
        alive = [i for i in instances if i.instance_id is not None and i.state is not State.GONE]
        return cls(len(alive), round(sum(i.billing_rate for i in alive), 3), round(dollars, 4))

    def line(self) -> str:
        alive = count(self.alive, "instance")
        return f"Vast.ai: {alive} alive, ${self.dph:.3f}/h, ${self.dollars:.4f} spent so far"


@dataclass
class SpendTicker:
    """The running total, called every SPEND_TICK_SECONDS: silent while nothing is alive
    and while the total has not changed."""

    _last: Spend | None = None

    def tick(self, instances: Iterable[Instance], dollars: float) -> None:
        spend = Spend.of(instances, dollars)
        if spend.alive == 0 or spend == self._last:
            return
        self._last = spend
        say(spend.line())
