"""The hosts a run will not rent from again.

Why: on a marketplace a machine that failed once (its instance would not boot or log in, went
offline, lost the job's connection, sent back damaged results) tends to fail again, and
Snakemake's ``--retries`` is only worth something if the retry lands on another machine. So
such a machine is excluded for the rest of the run, in the offer query itself
(``machine_id notin [...]``), and the cost summary says which and why.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.market.marketplace import Offer

log = get_logger(__name__)


@dataclass
class ExcludedHosts:
    """machine_id -> why; shared by every job thread of the run."""

    reasons: dict[int, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def exclude(self, offer: Offer | None, why: str) -> None:
        if offer is None or not offer.machine_id:
            return
        with self._lock:
            if offer.machine_id in self.reasons:
                return
            self.reasons[offer.machine_id] = why
        log.info(
            "Not renting from machine %d again in this run (%s)", offer.machine_id, why.rstrip(".")
        )

    def query_clause(self) -> str:
        """The offer-query filter that keeps the excluded machines out ("" when none)."""
        with self._lock:
            ids = sorted(self.reasons)
        return f"machine_id notin [{','.join(map(str, ids))}]" if ids else ""

    def allows(self, offer: Offer) -> bool:
        with self._lock:
            return offer.machine_id not in self.reasons

    def snapshot(self) -> dict[int, str]:
        with self._lock:
            return dict(self.reasons)
