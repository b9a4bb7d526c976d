"""What a job needs and what a machine's share has: the arithmetic that an offer (could it
ever hold the job?) and an instance's slots (can the job start now?) both do.

Why apart from ``slots``: the offer search must know whether an offer's share could ever
hold a job without knowing how the pool books the jobs on an instance."""

from __future__ import annotations

from dataclasses import dataclass

# A small margin for rounding in the marketplace's figures (cores are often 15.9 "effective").
EPSILON = 1e-6


@dataclass(frozen=True)
class Needs:
    """What one job takes from an instance while it runs."""

    gpus: int = 0
    cores: float = 1.0
    mem_gb: float = 0.0
    disk_gb: float = 0.0

    def __str__(self) -> str:
        return (
            f"{self.gpus} GPU(s), {self.cores:g} core(s), {self.mem_gb:g} GB RAM, "
            f"{self.disk_gb:g} GB disk"
        )


@dataclass(frozen=True)
class Capacity:
    """What a rented machine has in total."""

    gpus: int
    cores: float
    mem_gb: float
    disk_gb: float

    def holds(self, needs: Needs) -> bool:
        """Could a job with these needs run here, alone (once the others are done)?"""
        return (
            needs.gpus <= self.gpus
            and needs.cores <= self.cores + EPSILON
            and needs.mem_gb <= self.mem_gb + EPSILON
            and needs.disk_gb <= self.disk_gb + EPSILON
        )
