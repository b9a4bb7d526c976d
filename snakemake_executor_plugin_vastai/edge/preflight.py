"""Before the first rent: can every remote job of the DAG rent anything at all?

Why: a rule whose request no offer meets would otherwise be found out only when its first
job is submitted, possibly hours into a run that has paid for every job upstream of it. One
search per distinct offer query (one for all the queries that differ only in their GPU
model), through the run's shared search (so the first rents reuse the answers), settles it
before anything is rented. The check is advice: when the
marketplace cannot be searched, the run goes on and the rents retry on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from snakemake_executor_plugin_vastai.base.errors import UserError
from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.edge.resources import ResourceError, request_of
from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings
from snakemake_executor_plugin_vastai.market.diagnosis import diagnose, market_search
from snakemake_executor_plugin_vastai.market.marketplace import MarketplaceError
from snakemake_executor_plugin_vastai.market.request import ResourceRequest
from snakemake_executor_plugin_vastai.pool.renter import Renter

log = get_logger(__name__)

TBD = "<TBD>"  # Snakemake's value of a resource that depends on input not yet made

SearchKey = tuple[str, int, bool]


class Unrentable(UserError):
    """Some rules of the workflow match no offer; the message diagnoses each of them."""


class KnownResources:
    """A job as far as Snakemake can evaluate it before it runs: resources that depend on
    input not made yet (``<TBD>``, e.g. the default ``mem_mb`` of a downstream job) are
    left out, so that such a job is still checked on everything else it asks for."""

    def __init__(self, job: Any) -> None:
        self._job = job

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    @property
    def resources(self) -> dict[str, Any]:
        return {k: v for k, v in self._job.resources.items() if not _is_tbd(v)}

    @property
    def unknown(self) -> tuple[str, ...]:
        """The resources left out, less Snakemake's ``tmpdir`` and the aliases it derives
        from an ``X_mb``."""
        tbd = {name for name, value in self._job.resources.items() if _is_tbd(value)}
        tbd.discard("tmpdir")  # Snakemake's own, resolved on the instance
        aliases = {alias for name in tbd if name.endswith("_mb") for alias in _aliases(name)}
        return tuple(sorted(tbd - aliases))


def _is_tbd(value: object) -> bool:
    return isinstance(value, str) and value == TBD


def _aliases(size_mb: str) -> tuple[str, str]:
    """mem_mb -> (mem, mem_mib)."""
    stem = size_mb.removesuffix("_mb")
    return stem, f"{stem}_mib"


def planned_requests(
    jobs: Iterable[Any],
    settings: ExecutorSettings,
    is_preemptible: Callable[[str], bool] | None = None,
) -> dict[Any, ResourceRequest]:
    """Each job's request as far as it is known before it runs (see KnownResources), read
    once for every check before renting and for the pool's demand. A job with a bad
    resource is left out: it fails with that message when it is submitted."""
    planned = {}
    for job in jobs:
        try:
            planned[job] = request_of(KnownResources(job), settings, is_preemptible)
        except ResourceError:
            continue
    return planned


def by_search(requests: Iterable[ResourceRequest]) -> dict[SearchKey, list[ResourceRequest]]:
    """The requests grouped by the search they make (query, disk, interruptible)."""
    found: dict[SearchKey, list[ResourceRequest]] = {}
    for request in requests:
        found.setdefault(search_key(request), []).append(request)
    return found


def search_key(request: ResourceRequest) -> SearchKey:
    """Requests with equal keys make the same offer search."""
    return request.offer_query(), request.disk_gb, request.interruptible


def rules_of(requests: Iterable[ResourceRequest]) -> str:
    """'rule a' or 'rules a, b': who shares one offer query."""
    names = sorted({request.rule for request in requests})
    return f"rule {names[0]}" if len(names) == 1 else f"rules {', '.join(names)}"


def preflight(
    requests: Iterable[ResourceRequest], renter: Renter, settings: ExecutorSettings
) -> None:
    """Raise Unrentable, naming every rule that matches no offer and why, before anything
    is rented. A search that fails ends the check there (logged), and only what was found
    so far can stop the run."""
    problems = []
    search = market_search(renter.market, renter.excluded.query_clause())  # shared answers
    grouped = by_search(requests).values()
    try:
        renter.prefetch(requests[0] for requests in grouped)
    except MarketplaceError as error:
        log.warning("Could not check the offers before renting (%s); going on", error)
        return
    for requests in grouped:
        request = requests[0]
        try:
            if renter.candidates(request):
                continue
        except MarketplaceError as error:
            log.warning("Could not check the offers before renting (%s); going on", error)
            break
        diagnosis = diagnose(request, search, settings, who=rules_of(requests))
        problems.append(diagnosis.message)
    if problems:
        raise Unrentable("\n".join([*problems, "Nothing was rented."]))
