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

from snakemake_executor_plugin_vastai.diagnosis import diagnose, market_search
from snakemake_executor_plugin_vastai.errors import UserError
from snakemake_executor_plugin_vastai.logger import get_logger
from snakemake_executor_plugin_vastai.marketplace import MarketplaceError
from snakemake_executor_plugin_vastai.renter import Renter
from snakemake_executor_plugin_vastai.request import ResourceRequest
from snakemake_executor_plugin_vastai.resources import ResourceError, request_of
from snakemake_executor_plugin_vastai.settings import ExecutorSettings

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


def distinct_requests(
    jobs: Iterable[Any],
    settings: ExecutorSettings,
    is_preemptible: Callable[[str], bool] | None = None,
) -> dict[SearchKey, list[ResourceRequest]]:
    """The jobs' requests by the search they make (query, disk, interruptible). A job
    with a bad resource is left out: it fails with that message when it is submitted."""
    found: dict[SearchKey, list[ResourceRequest]] = {}
    for job in jobs:
        try:
            request = request_of(KnownResources(job), settings, is_preemptible)
        except ResourceError:
            continue
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
    jobs: Iterable[Any],
    renter: Renter,
    settings: ExecutorSettings,
    is_preemptible: Callable[[str], bool] | None = None,
) -> None:
    """Raise Unrentable, naming every rule that matches no offer and why, before anything
    is rented. A search that fails ends the check there (logged), and only what was found
    so far can stop the run."""
    problems = []
    search = market_search(renter.market, renter.excluded.query_clause())  # shared answers
    grouped = distinct_requests(jobs, settings, is_preemptible).values()
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
