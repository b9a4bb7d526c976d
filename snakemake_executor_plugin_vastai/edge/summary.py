"""The cost summary at the end of a run: what each instance did and cost, what the warm pool
saved, and how the run ended. Printed for the user and written as JSON under
``.snakemake/vastai/`` so that benchmarks, scripts and ``snakemake-vastai status`` can read it.

Time is counted as Vast.ai bills it, so the summary and the bill agree: each instance from its
creation, as the marketplace records it (its ``start_date``), to its destroy, at its $/h.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from snakemake_executor_plugin_vastai.pool.instance import Instance
from snakemake_executor_plugin_vastai.pool.ledger import billed_dollars

# How a run ended, as its summary records it (a run that never reached its teardown writes
# no summary at all).
FINISHED, FAILED, KILLED = "finished", "failed", "killed"
BILLING_NOTE = (
    "Counted as Vast.ai bills: each instance from its creation to its destroy at its $/h, "
    "plus its bandwidth."
)


@dataclass(frozen=True)
class InstanceCost:
    instance_id: int
    label: str
    gpu: str
    image: str
    jobs_run: int
    boot_seconds: float
    busy_seconds: float
    idle_seconds: float
    dph_total: float
    dollars: float  # time and data together
    data_dollars: float = 0.0  # of which the bytes moved (bandwidth)
    storage_dollars: float = 0.0  # of which its disk, billed whether it runs or is stopped
    stopped_seconds: float = 0.0  # stopped by the run (--vastai-pool-stop-after): disk only
    bid: bool = False  # an interruptible instance (--preemptible-rules)
    saved_dollars: float = 0.0  # a bid's saving over the same machine on demand

    @property
    def gpu_dollars(self) -> float:
        """Its price less the disk's, while it ran (nothing while stopped)."""
        return round(self.dollars - self.storage_dollars - self.data_dollars, 6)

    @classmethod
    def of(cls, instance: Instance, now: float) -> InstanceCost:
        start, end = billed_span(instance, now)
        life = end - start
        ready = instance.running_at if instance.running_at is not None else end
        boot = max(0.0, min(ready, end) - start)
        busy = min(instance.busy_seconds, life - boot)
        data = instance.data_cost()
        storage = instance.offer.storage_dph if instance.offer else 0.0
        time_dollars = billed_dollars(start, end, instance.dph_total) - instance.stop_saving(end)
        return cls(
            instance_id=instance.instance_id or 0,
            label=instance.label,
            gpu=f"{instance.offer.num_gpus}x {instance.offer.gpu_name}" if instance.offer else "?",
            image=instance.signature.image,
            jobs_run=instance.jobs_run,
            boot_seconds=round(boot, 2),
            busy_seconds=round(busy, 2),
            idle_seconds=round(max(0.0, life - boot - busy), 2),
            dph_total=instance.dph_total,
            dollars=round(time_dollars + data, 6),
            data_dollars=round(data, 6),
            storage_dollars=round(billed_dollars(start, end, storage), 6),
            stopped_seconds=round(instance.stopped_for(end), 2),
            bid=bool(instance.offer and instance.offer.bid_price is not None),
            saved_dollars=round(saved_by_bid(instance, life), 6),
        )


def billed_span(instance: Instance, now: float) -> tuple[float, float]:
    """(start, end) of what Vast.ai bills: from the creation the marketplace records (the
    instance's start_date; on this machine's clock, never before the run reserved it) to its
    destroy, or ``now`` while it lives. The run's own reservation starts earlier, by the offer
    search and the wait for its turn to create, which Vast.ai does not bill. An instance
    destroyed before any list showed it starts when the create's answer came."""
    end = instance.gone_at if instance.gone_at is not None else now
    start = instance.created_at or instance.rented_at
    if instance.info is not None and instance.info.start_date:
        start = max(instance.rented_at, instance.info.start_date)
    return start, max(start, end)


def saved_by_bid(instance: Instance, seconds: float) -> float:
    """What the same machine would have cost on demand, minus what the bid cost."""
    offer = instance.offer
    if offer is None or offer.bid_price is None or not offer.on_demand_dph:
        return 0.0
    return max(0.0, offer.on_demand_dph - instance.dph_total) * seconds / 3600


@dataclass(frozen=True)
class RunCost:
    run_id: str
    instances: list[InstanceCost]
    excluded_hosts: dict[int, str] = field(default_factory=dict)  # machine_id -> why
    outcome: str | None = None  # FINISHED, FAILED or KILLED; None: not told

    @property
    def dollars(self) -> float:
        return round(sum(i.dollars for i in self.instances), 6)

    @property
    def data_dollars(self) -> float:
        return round(sum(i.data_dollars for i in self.instances), 6)

    @property
    def jobs_run(self) -> int:
        return sum(i.jobs_run for i in self.instances)

    @property
    def saved_by_bids(self) -> float:
        return round(sum(i.saved_dollars for i in self.instances), 6)

    @property
    def boots_avoided(self) -> int:
        """Jobs that ran on an instance another job had already booted."""
        return sum(max(0, i.jobs_run - 1) for i in self.instances)

    def to_json(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "outcome": self.outcome,
            "instances": [asdict(i) | {"gpu_dollars": i.gpu_dollars} for i in self.instances],
            "excluded_hosts": {str(m): why for m, why in self.excluded_hosts.items()},
            "totals": {
                "instances": len(self.instances),
                "jobs_run": self.jobs_run,
                "boots_avoided": self.boots_avoided,
                "dollars": self.dollars,
                "data_dollars": self.data_dollars,
                "storage_dollars": round(sum(i.storage_dollars for i in self.instances), 6),
                "gpu_dollars": round(sum(i.gpu_dollars for i in self.instances), 6),
                "stopped_seconds": round(sum(i.stopped_seconds for i in self.instances), 2),
                "saved_by_bids": self.saved_by_bids,
                "boot_seconds": round(sum(i.boot_seconds for i in self.instances), 2),
                "busy_seconds": round(sum(i.busy_seconds for i in self.instances), 2),
                "idle_seconds": round(sum(i.idle_seconds for i in self.instances), 2),
            },
        }

    def write(self, directory: Path) -> Path:
        path = summary_path(directory, self.run_id)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def render(self) -> str:
        lines = [
            f"Vast.ai cost of run {self.run_id}: ${self.dollars:.4f} for {self.jobs_run} job(s) "
            f"on {len(self.instances)} instance(s); {self.boots_avoided} boot(s) avoided "
            "by reuse.",
            f"  {'instance':>10}  {'gpu':<16} {'jobs':>4} {'boot s':>7} {'busy s':>7} "
            f"{'idle s':>7} {'$/h':>7} {'gpu $':>8} {'disk $':>8} {'data $':>8} {'$':>8}",
        ]
        for i in self.instances:
            lines.append(
                f"  {i.instance_id:>10}  {i.gpu:<16} {i.jobs_run:>4} {i.boot_seconds:>7.1f} "
                f"{i.busy_seconds:>7.1f} {i.idle_seconds:>7.1f} {i.dph_total:>7.3f} "
                f"{i.gpu_dollars:>8.4f} {i.storage_dollars:>8.4f} {i.data_dollars:>8.4f} "
                f"{i.dollars:>8.4f}"
            )
        lines.append(f"  {BILLING_NOTE}")
        if self.data_dollars:
            lines.append(
                f"  Of the ${self.dollars:.4f}, ${self.data_dollars:.4f} is bandwidth (bytes to "
                "and from the instances, at each offer's $/GB)."
            )
        if self.saved_by_bids:
            bids = sum(i.bid for i in self.instances)
            lines.append(
                f"  Interruptible instances ({bids}) cost ${self.saved_by_bids:.4f} less than "
                "the same machines on demand."
            )
        if self.excluded_hosts:
            lines.append("  Machines not rented again in this run:")
            lines.extend(f"  {m:>10}  {why}" for m, why in sorted(self.excluded_hosts.items()))
        return "\n".join(lines)


def run_cost(
    run_id: str,
    instances: list[Instance],
    now: float,
    excluded: dict[int, str] | None = None,
    outcome: str | None = None,
) -> RunCost:
    rented = [i for i in instances if i.instance_id is not None]
    costs = [InstanceCost.of(i, now) for i in rented]
    return RunCost(run_id, costs, dict(excluded or {}), outcome)


def summary_path(directory: Path, run_id: str) -> Path:
    return directory / f"summary-{run_id}.json"


def recorded_outcome(directory: Path, run_id: str) -> str | None:
    """How a run ended, as its summary says: None when it wrote none (it never reached its
    teardown), "" when the summary does not say (written before outcomes were recorded)."""
    try:
        summary = json.loads(summary_path(directory, run_id).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return ""  # torn or unreadable: the run did reach its teardown
    return str(summary.get("outcome") or "") if isinstance(summary, dict) else ""
