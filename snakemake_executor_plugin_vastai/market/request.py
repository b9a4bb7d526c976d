"""What a job asks of the marketplace, once read: a :class:`ResourceRequest` yields the offer
query (vastai query syntax), the share of an instance the job takes, and the warm pool's
:class:`Signature` of the instance rented for it.

Why apart from reading the job (``resources``): everything below the Snakemake edge (the
offer search, the diagnosis, the pool) works from these plain values and never sees a
Snakemake job or option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from decimal import Decimal
from typing import Any

from snakemake_executor_plugin_vastai.market.shares import Needs

MIN_DISK_GB = 8
"""Vast.ai's create call refuses a smaller disk."""

_AT_LEAST = ("num_gpus", "cpu_cores", "mem_gb", "disk_gb")
_ANY_MODEL = "gpu_name"
"""None on the wanted side means "any GPU model"."""


@dataclass(frozen=True)
class Signature:
    """What an instance was rented for, so the warm pool can hand it to a later job.

    ``num_gpus``, ``cpu_cores``, ``mem_gb`` and ``disk_gb`` are *at least*: a bigger
    instance serves a smaller job (which sees only its own GPUs). ``gpu_name`` must be equal
    unless the job accepts any model. Everything else must be *equal*: the image and extra
    query decide what runs and where.
    """

    image: str
    gpu_name: str | None
    num_gpus: int
    geolocation: tuple[str, ...]
    datacenter_only: bool
    reliability: float
    extra_query: str
    interruptible: bool
    max_price: float | None
    cpu_cores: int
    mem_gb: float
    disk_gb: int

    def exact_key(self) -> tuple[Any, ...]:
        """The pool bucket: the fields that must be equal, in declaration order."""
        skipped = (*_AT_LEAST, _ANY_MODEL)
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in skipped)

    def with_capacity(
        self, gpu_name: str, num_gpus: int, cpu_cores: float, mem_gb: float, disk_gb: int
    ) -> Signature:
        """The signature of a rented machine: what the job asked for, with the GPU model
        and the at-least fields set to what the offer really has, so a 16-core machine
        rented for a 1-core job can later serve a 4-core one."""
        return replace(
            self,
            gpu_name=gpu_name or self.gpu_name,
            num_gpus=max(self.num_gpus, num_gpus),
            cpu_cores=max(self.cpu_cores, math.floor(cpu_cores)),
            mem_gb=max(self.mem_gb, mem_gb),
            disk_gb=max(self.disk_gb, disk_gb),
        )

    def same_kind(self, wanted: Signature) -> bool:
        """Equal where it must be (the GPU model too, unless ``wanted`` accepts any)."""
        return self.exact_key() == wanted.exact_key() and wanted.gpu_name in (
            None,
            self.gpu_name,
        )

    def can_serve(self, wanted: Signature) -> bool:
        """True if an instance rented for ``self`` may run a job that wants ``wanted``."""
        return self.same_kind(wanted) and all(
            getattr(self, name) >= getattr(wanted, name) for name in _AT_LEAST
        )


@dataclass(frozen=True)
class ResourceRequest:
    """One job's (or group job's) needs, validated. Build it with ``resources.request_of``,
    which checks every value; the constructor trusts its arguments. ``image``, ``disk_gb`` and
    ``interruptible`` are also what renting needs besides the offer query."""

    rule: str
    """For messages and labels: the rule name, or "group <id> (rules a, b)"."""
    num_gpus: int
    """GPUs the machine must have: at least 1, since Vast.ai rents only GPU machines."""
    gpu_name: str | None
    """With spaces, e.g. "RTX 4090"; None = any model."""
    cpu_cores: int | None
    """None = no CPU filter (1 thread)."""
    mem_gb: float | None
    """None = no RAM filter."""
    disk_gb: int
    """Disk to rent in GB; prices include it (search_offers(storage=))."""
    image: str
    geolocation: tuple[str, ...]
    """Sorted 2-letter country codes; empty = anywhere."""
    reliability: float
    """0 = no filter."""
    datacenter_only: bool
    max_price: float | None
    extra_query: str
    """--vastai-search-query, then the job's vastai_query, verbatim."""
    interruptible: bool = False
    """Rent as a bid (search type "bid", create price=): for --preemptible-rules."""
    deploy: tuple[str, ...] = ()
    """The job's ``deploy`` globs; the union with --vastai-deploy-paths is made elsewhere."""
    gpus: int = 1
    """GPUs the job takes for itself; 0 for a CPU job."""
    job_disk_gb: float = 0.0
    """The job's own disk_mb in GB: its share of the instance's disk."""
    upload_gb: float = 0.0
    """The job's input files (what it ships up), for ranking offers by their whole cost."""
    runtime_hours: float | None = None
    """Snakemake's ``runtime`` resource, when the job has a number for it."""

    def offer_query(self) -> str:
        """The offer search in vastai query syntax, in the order of the module's table."""
        terms = (
            f"num_gpus>={self.num_gpus}",
            self.gpu_name and f"gpu_name={self.gpu_name.replace(' ', '_')}",
            self.cpu_cores and f"cpu_cores_effective>={self.cpu_cores}",
            self.mem_gb and f"cpu_ram>={_plain(self.mem_gb)}",
            f"disk_space>={self.disk_gb}",
            self.reliability and f"reliability>={_plain(self.reliability)}",
            self.datacenter_only and "datacenter=True",
            self.geolocation and f"geolocation in [{','.join(self.geolocation)}]",
            self.max_price is not None and f"dph_total<={_plain(self.max_price)}",
            self.extra_query,
        )
        return " ".join(term for term in terms if term)

    def needs(self) -> Needs:
        """What the job takes from an instance while it runs (see ``slots``)."""
        return Needs(
            gpus=self.gpus,
            cores=float(self.cpu_cores or 1),
            mem_gb=self.mem_gb or 0.0,
            disk_gb=self.job_disk_gb,
        )

    def signature(self) -> Signature:
        """The warm-pool key of an instance rented for this request."""
        return Signature(
            image=self.image,
            gpu_name=self.gpu_name,
            num_gpus=self.num_gpus,
            geolocation=self.geolocation,
            datacenter_only=self.datacenter_only,
            reliability=self.reliability,
            extra_query=self.extra_query,
            interruptible=self.interruptible,
            max_price=self.max_price,
            cpu_cores=self.cpu_cores or 1,
            mem_gb=self.mem_gb or 0.0,
            disk_gb=self.disk_gb,
        )


def _plain(value: float) -> str:
    """A number as the query needs it: no exponent, no trailing zeros (0.5, 2, 0.00001)."""
    return format(Decimal(repr(value)).normalize(), "f")
