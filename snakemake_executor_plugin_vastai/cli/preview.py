"""``snakemake-vastai offers``: what each rule of a workflow would rent, and roughly what the
workflow would cost, before anything is rented.

Why: a run finds out about an impossible request or an expensive one only once it rents. Here
the workflow is loaded with Snakemake's own API (nothing runs), each rule's jobs become offer
queries exactly as in a run, and each distinct query is searched once: the first offers a
run would rent, or why none matches. Where a runtime is known (a ``runtime`` resource, or
the rule's benchmark files from earlier runs), jobs x runtime x price gives an estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import statistics
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from snakemake_executor_plugin_vastai.base.errors import UserError
from snakemake_executor_plugin_vastai.edge.preflight import KnownResources, SearchKey, search_key
from snakemake_executor_plugin_vastai.edge.resources import (
    ResourceError,
    request_of,
    validate_settings,
)
from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings
from snakemake_executor_plugin_vastai.edge.snakemake_internals import loaded_dag
from snakemake_executor_plugin_vastai.market.diagnosis import Diagnosis, diagnose, market_search
from snakemake_executor_plugin_vastai.market.hiddenoffers import HiddenOffers, hidden_by_defaults
from snakemake_executor_plugin_vastai.market.marketplace import Marketplace, Offer, helper_market
from snakemake_executor_plugin_vastai.market.request import ResourceRequest
from snakemake_executor_plugin_vastai.pool.renter import OfferSearch

SHOWN_OFFERS = 3
# The options that shape the offer query, offered as flags under their run names without
# the --vastai- prefix (their help is the run's).
QUERY_OPTIONS = (
    "gpu_name",
    "max_price",
    "geolocation",
    "reliability",
    "no_datacenter",
    "disk",
    "search_query",
    "order",
)
SUMMARY = "the offers each rule would rent now, and what the workflow may cost; rents nothing"
# Said instead of pricing "0 jobs to run": why there are none, and how to price them anyway
# (a user who has just run the workflow wants to know what the next run would cost).
NOTHING_TO_RUN = (
    "No job to run on Vast.ai: the workflow's outputs are up to date (or only local rules are "
    "left), so a run would rent nothing now. Add --all to price every job of the workflow, as "
    "if none had run yet."
)


class WorkflowLoadError(UserError):
    """Snakemake could not load the workflow or build its DAG."""


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``offers`` with the helper's subcommands."""
    sub = commands.add_parser(
        "offers",
        help=SUMMARY,
        description=f"{SUMMARY[0].upper()}{SUMMARY[1:]}. Exit status 1 when a rule can rent "
        "nothing (no offer matches, or the plugin refuses its resources).",
    )
    sub.add_argument(
        "--snakefile",
        metavar="FILE",
        help="the workflow's Snakefile, relative to --workdir (default: where Snakemake "
        "looks, e.g. Snakefile or workflow/Snakefile)",
    )
    sub.add_argument(
        "--all",
        action="store_true",
        help="price every job of the workflow, as if none had run yet (default: the jobs a "
        "run would start now)",
    )
    sub.add_argument("--json", action="store_true", help="print one JSON document instead")
    for option in fields(ExecutorSettings):
        if option.name in QUERY_OPTIONS:
            flag = "--" + option.name.replace("_", "-")
            helptext = f"as --vastai-{flag[2:]}: {option.metadata['help']}"
            if option.type is bool:
                sub.add_argument(flag, action="store_true", default=None, help=helptext)
            else:
                sub.add_argument(flag, type=_value_type(option.type), help=helptext)
    sub.set_defaults(command=show_offers)


def _value_type(annotation: Any) -> type:
    """str, int or float from ``Optional[X]`` or ``X`` (settings.py's field types)."""
    return next(t for t in (*typing.get_args(annotation), annotation) if t is not type(None))


def show_offers(args: argparse.Namespace, state_dir: Path) -> int:
    """The ``offers`` command: 0 when every rule can rent, 1 when one cannot (no offer,
    or resources the plugin refuses)."""
    chosen = {name: getattr(args, name) for name in QUERY_OPTIONS}
    settings = ExecutorSettings(**{k: v for k, v in chosen.items() if v is not None})
    validate_settings(settings)
    jobs, benchmarks = load_jobs(Path(args.workdir), args.snakefile, args.all, settings)
    if not (jobs or args.all or args.json):
        print(NOTHING_TO_RUN)
        return 0
    preview = price(jobs, benchmarks, helper_market(args.api_key, args.api_url), settings, args.all)
    print(json.dumps(preview.document(), indent=2) if args.json else preview.text())
    return 1 if preview.unrentable or preview.refused else 0


# -- the workflow, from Snakemake --------------------------------------------------------


@dataclass(frozen=True)
class JobView:
    """What the preview needs of one job to run, read while the workflow is loaded."""

    rule: str
    request: ResourceRequest | None
    error: str  # why the plugin would refuse the job's resources ("" if it would not)
    runtime_minutes: float | None  # the job's ``runtime`` resource
    unknown: tuple[str, ...] = ()  # resources that depend on input not made yet


def load_jobs(
    workdir: Path, snakefile: str | None, every_job: bool, settings: ExecutorSettings
) -> tuple[list[JobView], dict[str, list[Path]]]:
    """(the remote jobs to run, every benchmark file of each rule's jobs that exists).
    Snakemake's API has no public way to a DAG's jobs short of running them; this takes the
    path of its own ``--summary`` and ``--printdag``, with the plugin as the executor and
    the command line's resource settings, so that local rules and resources are a run's
    (``snakemake_internals.loaded_dag``)."""
    try:
        with loaded_dag(workdir, snakefile, every_job) as dag:
            jobs = [_view(job, settings) for job in dag.needrun_jobs() if not job.is_local]
            benchmarks: dict[str, list[Path]] = {}
            for job in dag.jobs:
                if job.benchmark and Path(job.benchmark).is_file():
                    benchmarks.setdefault(job.name, []).append(Path(job.benchmark).absolute())
    except Exception as error:  # the Snakefile is user code: anything it raises is reported
        raise WorkflowLoadError(f"Snakemake could not load the workflow: {error}") from error
    return jobs, benchmarks


def _view(job: Any, settings: ExecutorSettings) -> JobView:
    """The job as the plugin would see it, with the resources Snakemake can tell now."""
    known = KnownResources(job)
    runtime = known.resources.get("runtime")
    minutes = float(runtime) if isinstance(runtime, int | float) else None
    try:
        request = request_of(known, settings)
    except ResourceError as error:
        return JobView(job.name, None, str(error), minutes, known.unknown)
    return JobView(job.name, request, "", minutes, known.unknown)


# -- runtimes ------------------------------------------------------------------------------


def benchmark_seconds(paths: Iterable[Path]) -> float | None:
    """The mean wall time (the ``s`` column) over a rule's benchmark files, every repeat
    counted; None when none can be read."""
    seconds = []
    for path in paths:
        with contextlib.suppress(OSError, ValueError, KeyError, csv.Error), path.open() as table:
            seconds += [float(row["s"]) for row in csv.DictReader(table, delimiter="\t")]
    return statistics.fmean(seconds) if seconds else None


# -- prices --------------------------------------------------------------------------------


@dataclass
class RuleOffers:
    """A rule's jobs that make one offer search (or whose resources the plugin refuses)."""

    rule: str
    request: ResourceRequest | None  # the first job's; every job here searches the same
    error: str = ""  # why the plugin refuses the jobs' resources
    jobs: int = 0
    offers: list[Offer] = field(default_factory=list)
    diagnosis: Diagnosis | None = None
    runtime_s: float = 0.0  # summed over the jobs whose runtime is known
    timed_jobs: int = 0
    runtime_source: str = ""
    unknown: set[str] = field(default_factory=set)  # resources left out of the query
    hidden: HiddenOffers | None = None  # cheaper offers the defaults leave out

    def add_job(self, job: JobView, measured_s: float | None) -> None:
        """Measured beats declared: a ``runtime`` resource is often a generous limit."""
        self.jobs += 1
        self.unknown.update(job.unknown)
        runtime_minutes = job.runtime_minutes
        if measured_s is not None:
            seconds, self.runtime_source = measured_s, "benchmarks of earlier runs"
        elif runtime_minutes is not None:
            seconds, self.runtime_source = runtime_minutes * 60, "runtime resource"
        else:
            return
        self.runtime_s += seconds
        self.timed_jobs += 1

    @property
    def rentable(self) -> bool:
        return bool(self.offers)

    @property
    def cost(self) -> float | None:
        """Dollars for the timed jobs at the first offer, each job on an instance alone."""
        if not (self.offers and self.timed_jobs):
            return None
        return self.runtime_s / 3600 * self.offers[0].dph_total

    def document(self) -> dict[str, Any]:
        diagnosis = None
        if self.diagnosis is not None:
            diagnosis = {"message": self.diagnosis.message, **asdict(self.diagnosis)}
        runtime = None
        if self.timed_jobs:
            runtime = {
                "seconds": self.runtime_s,
                "jobs": self.timed_jobs,
                "source": self.runtime_source,
            }
        return {
            "rule": self.rule,
            "jobs": self.jobs,
            "query": self.request.offer_query() if self.request else None,
            "disk_gb": self.request.disk_gb if self.request else None,
            "offers": [_offer_document(offer) for offer in self.offers],
            "diagnosis": diagnosis,
            "error": self.error or None,
            "unknown_resources": sorted(self.unknown),
            "defaults_leave_out": self._hidden_document(),
            "runtime": runtime,
            "cost_usd": self.cost,
        }

    def _hidden_document(self) -> dict[str, Any] | None:
        if self.hidden is None:
            return None
        return {
            "offers": self.hidden.count,
            "at_least": self.hidden.at_least,
            "cheapest_dph_total": self.hidden.cheapest,
            "options": [option for _, option in self.hidden.left_out],
            "message": self.hidden.sentence(),
        }

    def text(self) -> list[str]:
        lines = [f"rule {self.rule}: {_count(self.jobs, 'job')}"]
        if self.request is None:
            return [*lines, f"  Refused: {self.error}"]
        lines.append(f"  query: {self.request.offer_query()}")
        if self.unknown:
            names = ", ".join(sorted(self.unknown))
            lines.append(f"  (not in the query: {names}, known once the job's input exists)")
        if self.diagnosis is not None:
            return [*lines, f"  No offer. {self.diagnosis.message}"]
        lines += ["  " + line for line in _offer_table(self.offers)]
        if self.hidden is not None:
            lines.append(f"  {self.hidden.sentence()}")
        if self.timed_jobs:
            lines.append(
                f"  runtime: {_duration(self.runtime_s)} for {_count(self.timed_jobs, 'job')} "
                f"({self.runtime_source}), about {_dollars(self.cost or 0.0)}"
            )
        else:
            lines.append("  runtime: unknown")
        return lines


@dataclass
class Preview:
    api_url: str
    order: str
    every_job: bool
    rules: list[RuleOffers]

    @property
    def unrentable(self) -> list[str]:
        return _names(entry for entry in self.rules if entry.diagnosis)

    @property
    def refused(self) -> list[str]:
        return _names(entry for entry in self.rules if entry.error)

    def estimate(self) -> dict[str, Any]:
        priced = [entry for entry in self.rules if entry.cost is not None]
        untimed = (
            entry for entry in self.rules if entry.rentable and entry.timed_jobs < entry.jobs
        )
        return {
            "usd": sum(entry.cost or 0.0 for entry in priced),
            "instance_hours": sum(entry.runtime_s for entry in priced) / 3600,
            "jobs": sum(entry.timed_jobs for entry in priced),
            "rules_without_runtime": _names(untimed),
            "rules_without_offer": self.unrentable,
            "rules_refused": self.refused,
        }

    def document(self) -> dict[str, Any]:
        return {
            "api_url": self.api_url,
            "order": self.order,
            "jobs": "all" if self.every_job else "to run",
            "rules": [entry.document() for entry in self.rules],
            "estimate": self.estimate(),
        }

    def text(self) -> str:
        scope = "in the workflow" if self.every_job else "to run"
        jobs = _count(sum(entry.jobs for entry in self.rules), "job")
        rules = _count(len(_names(self.rules)), "remote rule")
        lines = [
            f"{jobs} {scope} in {rules}; offers at {self.api_url}, first by {self.order}, "
            "priced with the disk each job rents."
        ]
        for entry in self.rules:
            lines += ["", *entry.text()]
        return "\n".join([*lines, "", *self._estimate_text(), "Nothing was rented."])

    def _estimate_text(self) -> list[str]:
        estimate = self.estimate()
        lines = ["Estimate: no job has a known runtime."]
        if estimate["jobs"]:
            lines = [
                f"Estimate: {_dollars(estimate['usd'])} for "
                f"{_duration(estimate['instance_hours'] * 3600)} of instance time "
                f"({_count(estimate['jobs'], 'job')} with a known runtime, "
                "each alone on its rule's first offer; boots, idle time and jobs sharing an "
                "instance are not counted)."
            ]
        if estimate["rules_without_runtime"]:
            lines.append(
                f"No runtime known for {', '.join(estimate['rules_without_runtime'])}: give "
                "the rule a `runtime` resource (minutes), or run it once with `benchmark:`."
            )
        if self.unrentable:
            lines.append(f"No offer, not priced: {', '.join(self.unrentable)}.")
        if self.refused:
            lines.append(f"Resources refused, not priced: {', '.join(self.refused)}.")
        return lines


def price(
    jobs: list[JobView],
    benchmarks: dict[str, list[Path]],
    market: Marketplace,
    settings: ExecutorSettings,
    every_job: bool = False,
) -> Preview:
    """Search once per distinct offer query; diagnose each query that finds nothing."""
    measured = {rule: benchmark_seconds(paths) for rule, paths in benchmarks.items()}
    entries: dict[tuple[str, SearchKey | str], RuleOffers] = {}
    for job in jobs:
        group = search_key(job.request) if job.request else job.error
        entry = entries.setdefault((job.rule, group), RuleOffers(job.rule, job.request, job.error))
        entry.add_job(job, measured.get(job.rule))
    # Shared with the run that follows (the shelf), and one search for the rules that
    # differ only in their GPU model; priced on demand, as the table says.
    search = OfferSearch(market, settings.order)
    search.prefetch(
        replace(entry.request, interruptible=False)
        for entry in entries.values()
        if entry.request is not None
    )
    # The diagnoses and the searches without the defaults share their answers: one search
    # per distinct query.
    market_answers = market_search(market)
    for entry in entries.values():
        request = entry.request
        if request is None:
            continue
        found = search.offers(request.offer_query(), request.disk_gb)
        entry.offers = found[:SHOWN_OFFERS]
        if entry.offers:
            entry.hidden = hidden_by_defaults(request, found, market_answers)
        else:
            entry.diagnosis = diagnose(request, market_answers, settings)
    ordered = sorted(entries.values(), key=lambda entry: (entry.rule, entry.jobs))
    return Preview(market.api_url, settings.order, every_job, ordered)


# -- wording -------------------------------------------------------------------------------

TABLE = (  # heading, width, how a cell reads
    ("$/h", 7, lambda o: f"{o.dph_total:.3f}"),
    ("GPU", 16, lambda o: f"{o.num_gpus}x {o.gpu_name}"),
    ("cores", 5, lambda o: f"{o.cpu_cores:g}"),
    ("RAM GB", 6, lambda o: f"{o.cpu_ram_mb / 1000:.0f}"),
    ("region", 20, lambda o: o.geolocation or "?"),
    ("reliability", 11, lambda o: f"{o.reliability:.1%}"),
)
LEFT = {"GPU", "region"}


def _offer_table(offers: list[Offer]) -> list[str]:
    def line(cells: Iterable[str]) -> str:
        aligned = [
            cell.ljust(width) if heading in LEFT else cell.rjust(width)
            for cell, (heading, width, _) in zip(cells, TABLE, strict=True)
        ]
        return "  ".join(aligned).rstrip()

    return [
        line(heading for heading, _, _ in TABLE),
        *(line(cell(offer) for _, _, cell in TABLE) for offer in offers),
    ]


def _offer_document(offer: Offer) -> dict[str, Any]:
    return {
        "id": offer.id,
        "dph_total": offer.dph_total,
        "gpu_name": offer.gpu_name,
        "num_gpus": offer.num_gpus,
        "cpu_cores": offer.cpu_cores,
        "cpu_ram_gb": offer.cpu_ram_mb / 1000,
        "disk_gb": offer.disk_gb,
        "geolocation": offer.geolocation,
        "reliability": offer.reliability,
    }


def _names(entries: Iterable[RuleOffers]) -> list[str]:
    return sorted({entry.rule for entry in entries})


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    return f"{seconds / 60:.3g} min" if seconds < 7200 else f"{seconds / 3600:.3g} h"


def _dollars(amount: float) -> str:
    return f"${amount:.2f}" if amount >= 0.01 or amount == 0 else f"${amount:.4f}"


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
