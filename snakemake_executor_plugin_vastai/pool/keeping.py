"""Keeping idle instances warm past the run's end (``--vastai-keep-warm``).

Why: the loop people live in is run, edit, run again, and every rerun used to pay a rent, an
image pull, a boot and a bootstrap for work of seconds. An instance idle at a finished or
failed run's end may stay up for the keep-warm time; its own dead-man switch is handed that
deadline (on the host, ``keep-until``), so it ends then even if nobody ever returns. The ledger
records what the next run needs to adopt it (:mod:`.adoption`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from snakemake_executor_plugin_vastai.market.marketplace import Offer
from snakemake_executor_plugin_vastai.market.request import Signature
from snakemake_executor_plugin_vastai.pool.instance import Instance
from snakemake_executor_plugin_vastai.pool.ledger import (
    InstanceRecord,
    Ledger,
    billed_dollars,
    run_is_alive,
)
from snakemake_executor_plugin_vastai.pool.states import State
from snakemake_executor_plugin_vastai.remote.bootstrap import keep_command
from snakemake_executor_plugin_vastai.remote.ssh import RemoteError
from snakemake_executor_plugin_vastai.remote.sshkey import remove_keys_except

KEEP_COMMAND_SECONDS = 20.0  # setting one instance's deadline over its open connection


def switch_check_seconds(deadman: float) -> float:
    """How often an instance's dead-man switch looks (onhost/watchdog.py): it ends a kept
    instance at most this long after its deadline."""
    return max(1.0, min(10.0, deadman / 4))


@dataclass(frozen=True)
class KeptInstance:
    """What the ledger keeps of an instance left up past its run: enough for the next run
    to adopt it without asking the marketplace anything but the instance list."""

    instance_id: int
    deadline: float  # this machine's clock; the host ends it by its own clock, as close
    signature: Signature
    offer: Offer
    deadman: float  # its switch's period, fixed when it booted
    bootstrap: str  # the bootstrap key it has (another key is bootstrapped again)
    digests: tuple[str, ...]  # what its content store holds
    born_at: float  # when it was first rented (--vastai-pool-max-lifetime counts from here)

    @classmethod
    def of(cls, instance: Instance, deadline: float, bootstrap: str) -> KeptInstance:
        assert instance.instance_id is not None and instance.offer is not None
        return cls(
            instance_id=instance.instance_id,
            deadline=deadline,
            signature=instance.signature,
            offer=instance.offer,
            deadman=instance.deadman,
            bootstrap=bootstrap,
            digests=tuple(sorted(instance.files.digests)),
            born_at=instance.born_at or instance.rented_at,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeptInstance | None:
        """None for a record this plugin cannot read (torn, or another version's): such an
        instance is not adopted, and ends at its deadline as promised."""
        try:
            signature = dict(data["signature"])
            signature["geolocation"] = tuple(signature["geolocation"])
            return cls(
                instance_id=int(data["instance_id"]),
                deadline=float(data["deadline"]),
                signature=Signature(**signature),
                offer=Offer(**data["offer"]),
                deadman=float(data["deadman"]),
                bootstrap=str(data["bootstrap"]),
                digests=tuple(data["digests"]),
                born_at=float(data["born_at"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


def found_gone_end(record: InstanceRecord, now: float) -> float:
    """Where the bill of an instance found no longer listed ended, at the latest: now; for
    one kept warm, its deadline plus one look of its switch, which ended it then unless
    someone destroyed it sooner (a run that comes back days later must not bill the gap)."""
    kept = KeptInstance.from_json(record.kept) if record.kept else None
    if kept is None:
        return now
    return min(now, kept.deadline + switch_check_seconds(kept.deadman))


def keepable(instance: Instance) -> bool:
    """Idle and sound at the run's end: prepared, logged in, guarded by its dead-man switch
    (an unguarded instance is never left behind), and not on its way out."""
    return (
        instance.state is State.IDLE
        and instance.host is not None
        and instance.deadman > 0
        and instance.retiring is None
        and not instance.lost_reason
        and instance.instance_id is not None
        and instance.offer is not None
        and instance.slots is not None
    )


@dataclass
class Keeping:
    """Hands each chosen instance its deadline and records it, each on its own thread so one
    slow host never delays the others (nor the teardown's destroys, which go out meanwhile)."""

    ledger: Ledger
    seconds: float
    bootstrap: str

    def start(self, instances: list[Instance]) -> list[threading.Thread]:
        deadline = time.time() + self.seconds
        threads = [
            threading.Thread(target=self._keep, args=(i, deadline), name="vastai-keep", daemon=True)
            for i in instances
        ]
        for thread in threads:
            thread.start()
        return threads

    def _keep(self, instance: Instance, deadline: float) -> None:
        """Sets the host's deadline, then records it; on any failure the instance is marked
        for the teardown to destroy (``failure`` says why)."""
        assert instance.host is not None
        try:
            result = instance.host.run(
                keep_command(deadline - time.time()), timeout=KEEP_COMMAND_SECONDS
            )
            if result.exit_code != 0:
                raise RemoteError(result.stderr.strip() or f"exit code {result.exit_code}")
            kept = KeptInstance.of(instance, deadline, self.bootstrap)
            self.ledger.data_billed(instance.label, instance.data_cost())
            self.ledger.kept(instance.label, kept.to_json())
        except (RemoteError, OSError) as error:
            instance.failure = f"its keep-warm deadline could not be set: {error}"
            return
        instance.kept_until = deadline
        instance.gone_at = time.time()  # it leaves this run's bill here
        instance.close()


def forget_unused_keys(ledger: Ledger, state_dir: Path, ending: str | None) -> list[str]:
    """Delete the run keys nothing needs any more; the names deleted. A key stays while its
    run lives, and while an instance that accepts it may live: kept warm, or adopted by a
    live run. ``ending``: a run at its end, whose lock is still held but whose jobs are over.
    """

    def alive(run_id: str) -> bool:
        return run_id != ending and run_is_alive(state_dir, run_id)

    keys = state_dir / "keys"
    wanted = {path.name.removesuffix(".pub") for path in keys.glob("*")} if keys.is_dir() else set()
    wanted = {name for name in wanted if alive(name)}
    for record in ledger.records():
        if record.open and (record.kept_until() is not None or alive(record.run_id)):
            wanted.add(record.key)
    return remove_keys_except(keys, wanted)


def most_kept_cost(instances: list[Instance], now: float) -> float:
    """What the kept instances cost at most if no run comes back: each at its price until
    its switch ends it (its deadline, plus one look of the switch)."""
    return sum(
        billed_dollars(now, (i.kept_until or now) + switch_check_seconds(i.deadman), i.dph_total)
        for i in instances
    )


def kept_note(instances: list[Instance], now: float) -> str:
    """The run's last word on what stays up: which, until when, the most it costs, and the
    command that ends it now."""
    until = max(i.kept_until or now for i in instances)
    names = ", ".join(
        f"instance {i.instance_id} ({i.offer.num_gpus if i.offer else '?'}x "
        f"{i.offer.gpu_name if i.offer else '?'}, ${i.dph_total:.3f}/h)"
        for i in instances
    )
    return (
        f"Kept warm for the next run in this directory until "
        f"{time.strftime('%H:%M:%S', time.localtime(until))} ({until - now:.0f} s): {names}. "
        f"Unused, they cost at most ${most_kept_cost(instances, now):.4f} more; each one's "
        "dead-man switch ends it at that deadline. 'snakemake-vastai reap' ends them now."
    )
