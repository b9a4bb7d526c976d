"""An instance as a set of slots: its GPUs, cores, RAM and disk, shared by the jobs on it.

Why: Vast.ai rents only GPU machines, and a machine rented for one small job usually has
many more cores than that job uses. Several jobs run side by side on one instance as long as
their threads, memory and disk add up to no more than the machine has, and each GPU is held
by one job at a time (handed out through ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from snakemake_executor_plugin_vastai.base.errors import PluginBug
from snakemake_executor_plugin_vastai.market.shares import EPSILON, Capacity, Needs


@dataclass(frozen=True, eq=False)
class Lease:
    """One job's share of an instance. ``gpu_ids`` is None for a job that holds the whole
    instance (no packing): it sees every GPU, as on a machine of its own."""

    needs: Needs
    gpu_ids: tuple[int, ...] | None

    def environment(self) -> dict[str, str]:
        """The variables that confine the job to its GPUs (none for a whole instance)."""
        if self.gpu_ids is None:
            return {}
        devices = ",".join(str(i) for i in self.gpu_ids)
        return {"CUDA_VISIBLE_DEVICES": devices, "NVIDIA_VISIBLE_DEVICES": devices or "void"}


@dataclass
class SlotBook:
    """Who holds what on one instance. Not thread-safe: the instance table's lock guards it."""

    capacity: Capacity
    exclusive: bool = False  # no packing: one job at a time, holding everything
    leases: list[Lease] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.leases

    def fits(self, needs: Needs) -> bool:
        """Could a job with these needs start here now?"""
        if self.exclusive:
            return self.empty and self.capacity.holds(needs)
        used = self._used()
        return (
            len(self._free_gpus()) >= needs.gpus
            and used.cores + needs.cores <= self.capacity.cores + EPSILON
            and used.mem_gb + needs.mem_gb <= self.capacity.mem_gb + EPSILON
            and used.disk_gb + needs.disk_gb <= self.capacity.disk_gb + EPSILON
        )

    def take(self, needs: Needs) -> Lease:
        if not self.fits(needs):
            raise PluginBug(f"{needs} does not fit into what is free of {self.capacity}")
        gpu_ids = None if self.exclusive else tuple(self._free_gpus()[: needs.gpus])
        lease = Lease(needs, gpu_ids)
        self.leases.append(lease)
        return lease

    def give_back(self, lease: Lease) -> None:
        self.leases.remove(lease)

    def _free_gpus(self) -> list[int]:
        held = {i for lease in self.leases for i in lease.gpu_ids or ()}
        return [i for i in range(self.capacity.gpus) if i not in held]

    def _used(self) -> Needs:
        return Needs(
            gpus=0,
            cores=sum(lease.needs.cores for lease in self.leases),
            mem_gb=sum(lease.needs.mem_gb for lease in self.leases),
            disk_gb=sum(lease.needs.disk_gb for lease in self.leases),
        )
