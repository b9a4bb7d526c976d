"""What the rest of the workflow still wants: the signatures of the jobs not yet submitted.

Why: an idle instance that no remaining job can use only adds to the bill while it waits out
its TTL. The executor knows the DAG, so it counts the remaining jobs by signature once and
counts each one off as it is submitted; the pool asks here before keeping an instance.
Jobs that only appear later (after a checkpoint) are not counted: at worst such a job boots
a new instance, it never waits for one.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable

from snakemake_executor_plugin_vastai.market.request import Signature


class Demand:
    def __init__(self) -> None:
        self._counts: Counter[Signature] = Counter()
        self._known = False
        self._lock = threading.Lock()

    def reset(self, signatures: Iterable[Signature]) -> None:
        with self._lock:
            self._counts = Counter(signatures)
            self._known = True

    def submitted(self, signatures: Iterable[Signature]) -> None:
        with self._lock:
            for signature in signatures:
                if self._counts[signature] > 0:
                    self._counts[signature] -= 1

    def returned(self, signatures: Iterable[Signature]) -> None:
        """A job failed and may be retried: it is wanted again."""
        with self._lock:
            self._counts.update(signatures)

    def wants(self, offered: Signature) -> bool:
        """Could a job still to come run on an instance with this signature? Until the
        DAG has been counted, assume it could."""
        with self._lock:
            if not self._known:
                return True
            return any(count > 0 and offered.can_serve(s) for s, count in self._counts.items())
