"""Everything one Snakemake run owns on Vast.ai, made once at start and closed once at the end.

Why checks come first here: a missing or rejected API key, or a bad option, must stop the run
with a clear message before anything is rented (the credential check is one cheap API call).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.edge.jobrun import JobSpec
from snakemake_executor_plugin_vastai.edge.preflight import planned_requests, preflight
from snakemake_executor_plugin_vastai.edge.resources import request_of, validate_settings
from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings
from snakemake_executor_plugin_vastai.edge.startchecks import (
    PlannedJob,
    cpu_only_notice,
    not_git_warning,
    refuse_outside_outputs,
    require_supported_snakemake,
    unshipped_warning,
)
from snakemake_executor_plugin_vastai.edge.summary import FAILED, FINISHED, run_cost
from snakemake_executor_plugin_vastai.market.marketplace import (
    Marketplace,
    pacing_wanted,
    resolve_api_key,
    resolve_api_url,
)
from snakemake_executor_plugin_vastai.market.request import ResourceRequest
from snakemake_executor_plugin_vastai.pool.caps import Caps
from snakemake_executor_plugin_vastai.pool.instance import BYTES_PER_GB, Instance
from snakemake_executor_plugin_vastai.pool.keeping import forget_unused_keys, kept_note
from snakemake_executor_plugin_vastai.pool.ledger import Ledger, RunLock, new_run_id
from snakemake_executor_plugin_vastai.pool.placement import Pool, PoolConfig
from snakemake_executor_plugin_vastai.pool.reaper import Reaper
from snakemake_executor_plugin_vastai.pool.states import State
from snakemake_executor_plugin_vastai.remote.bootstrap import BootstrapPlan
from snakemake_executor_plugin_vastai.remote.credentials import secrets
from snakemake_executor_plugin_vastai.remote.sshkey import RunKey
from snakemake_executor_plugin_vastai.remote.staging import (
    DigestCache,
    SourceBundle,
    local_bytes,
    select_sources,
)

log = get_logger(__name__)

SourceLists = Callable[[], tuple[list[str], list[str]]]


@dataclass
class RunContext:
    settings: ExecutorSettings
    state_dir: Path
    run_id: str
    market: Marketplace
    ledger: Ledger
    lock: RunLock
    key: RunKey
    pool: Pool
    reaper: Reaper
    envvars: dict[str, str]
    source_lists: SourceLists
    digests: DigestCache = field(default_factory=DigestCache)
    rule_deploy: set[str] = field(default_factory=set)  # every remote job's `deploy` globs
    is_preemptible: Callable[[str], bool] | None = None
    # every remote job's request as known at the first submission (see plan)
    planned: dict[Any, ResourceRequest] = field(default_factory=dict)
    _bundle: SourceBundle | None = None
    _bundle_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(
        cls,
        settings: ExecutorSettings,
        state_dir: Path,
        envvars: dict[str, str],
        bootstrap_packages: tuple[str, ...],
        sources: SourceLists,
        max_jobs: int,
        is_preemptible: Callable[[str], bool] | None = None,
    ) -> RunContext:
        """``is_preemptible``: Snakemake's --preemptible-rules test (those rent bids)."""
        require_supported_snakemake(version("snakemake"))
        validate_settings(settings)
        api_url = resolve_api_url(settings.api_url)
        market = Marketplace(resolve_api_key(settings.api_key), api_url, paced=pacing_wanted())
        for value in secrets(envvars):
            market.add_secret(value)
        market.check_credentials()
        run_id = new_run_id()
        ledger = Ledger(state_dir)
        key = RunKey.create(state_dir / "keys", run_id)
        deadman = 0.0 if settings.keep_instances else float(settings.deadman or 0)
        plan = BootstrapPlan(
            version("snakemake"),
            bootstrap_packages,
            runner=not settings.no_runner,
            deadman=deadman,
            api_url=api_url,
        )
        config = PoolConfig(
            run_id=run_id,
            order=settings.order,
            boot_timeout=float(settings.boot_timeout),
            keep_instances=settings.keep_instances,
            bootstrap=plan,
            ttl=float(settings.pool_ttl),
            max_lifetime=float(settings.pool_max_lifetime),
            max_price=settings.max_price,
            caps=Caps(
                max_instances=settings.pool_max_instances or max_jobs,
                max_total_price=settings.max_total_price,
                budget=settings.budget,
            ),
            pack=not settings.no_pack,
            bid_factor=float(settings.bid_factor or 1.0),
            keep_warm=float(settings.keep_warm or 0),
            stop_after=float(settings.pool_stop_after or 0),
            start_timeout=float(settings.start_timeout),
        )
        pool = Pool(market, ledger, key, config)
        reaper = Reaper(pool, market, ledger, state_dir, run_id)
        context = cls(
            settings=settings,
            state_dir=state_dir,
            run_id=run_id,
            market=market,
            ledger=ledger,
            lock=RunLock(state_dir, run_id),
            key=key,
            pool=pool,
            reaper=reaper,
            envvars=envvars,
            source_lists=sources,
            is_preemptible=is_preemptible,
        )
        reaper.start(deadman)
        return context

    def job_spec(self, job: Any, command: str) -> JobSpec:
        """The plain facts of a Snakemake job; raises ResourceError for bad resources."""
        inputs = [str(f) for f in job.input if not is_storage(f)]
        request = replace(
            request_of(job, self.settings, self.is_preemptible),
            upload_gb=local_bytes(inputs) / BYTES_PER_GB,
        )
        members = list(job.jobs) if job.is_group() else [job]
        tag = job_tag(job)
        outputs, logs = returned_files(job)
        return JobSpec(
            name=describe(job),
            tag=tag,
            request=request,
            command=command,
            env=self.envvars,
            inputs=inputs,
            outputs=outputs,
            logs=logs,
            local_log=Path(".snakemake/auxiliary/vastai-logs") / f"{tag}.log",
            max_runtime=float(self.settings.max_runtime),
            counted=tuple(self.planned[m].signature() for m in members if m in self.planned),
        )

    def plan(self, jobs: Any) -> None:
        """Read every remote job's resources once, when the DAG is complete (the first
        submission): the pool's demand, the checks before renting and the offer check all
        work from these requests (a job's own request is read again when it is submitted,
        with the resources that depend on its input known by then)."""
        self.planned = planned_requests(jobs, self.settings, self.is_preemptible)
        for request in self.planned.values():
            self.rule_deploy.update(request.deploy)
        self.pool.demand.reset(r.signature() for r in self.planned.values())

    def adopt_kept(self) -> None:
        """Take over what an earlier run of this workdir kept warm, before anything is
        rented (after the checks that need no API call)."""
        self.pool.adopt_kept()

    def check_offers(self) -> None:
        """Search once per distinct offer query of the remote jobs, through the pool's
        shared search (the first rents reuse the answers). Raises Unrentable, with a
        diagnosis per rule, when some rule matches no offer: nothing is rented yet. A job
        that an adopted instance can serve needs no offer."""
        adopted = [i.signature for i in self.pool.instances()]
        unserved = [
            request
            for request in self.planned.values()
            if not any(s.can_serve(request.signature()) for s in adopted)
        ]
        preflight(unserved, self.pool.renter, self.settings)

    def check_before_renting(self, jobs: Any, workdir: Path) -> None:
        """Refuse what cannot work remotely and say what may surprise, once per run, before
        the first rent. Raises OutsideWorkdirError."""
        planned = []
        for job, request in self.planned.items():
            outputs, logs = returned_files(job)
            planned.append(PlannedJob(request.rule, (*outputs, *logs), request.gpus > 0))
        refuse_outside_outputs(planned, workdir)
        notice = cpu_only_notice(planned)
        if notice:
            log.info("%s", notice)  # may well be meant: said once, not as a warning
        shipped = list(self.source_bundle().files)
        warning = not_git_warning(workdir, shipped) or unshipped_warning(
            workdir, shipped, declared_files(jobs)
        )
        if warning:
            log.warning("%s", warning)

    def source_bundle(self) -> SourceBundle:
        """Packed on first use (the DAG is complete by then), then shared by every job."""
        with self._bundle_lock:
            if self._bundle is None:
                essential, tracked = self.source_lists()
                globs = [g.strip() for g in (self.settings.deploy_paths or "").split(",")]
                files = select_sources(essential, tracked, globs, sorted(self.rule_deploy))
                self._bundle = SourceBundle.build(files, self.state_dir / "sources")
            return self._bundle

    def close(self, outcome: str) -> None:
        """The run's end: ``outcome`` (finished, failed or killed) goes into its summary."""
        try:
            # first: every destroy goes out before anything else waits; an interrupted run
            # keeps nothing warm
            self.pool.shutdown(keep_warm=outcome in (FINISHED, FAILED))
            self.reaper.stop()
            self._report_teardown()
            self._report_cost(outcome)
        finally:
            self._settle_key()
            self.lock.release()

    def _settle_key(self) -> None:
        """The run's key goes with the run, unless an instance that accepts it stays up:
        kept warm (until the last of them is gone), or kept for debugging."""
        if self.settings.keep_instances:
            log.warning(
                "The kept instances accept SSH logins as root with %s; it stays until you "
                "delete it",
                self.key.private_path,
            )
            return
        try:
            forget_unused_keys(self.ledger, self.state_dir, ending=self.run_id)
        except OSError as error:
            log.warning("Could not delete the run keys no instance needs: %s", error)

    def _report_teardown(self) -> None:
        """One line the user can trust: every instance of the run is gone, or which may not
        be and what to do."""
        if self.settings.keep_instances:
            return  # the pool has said what it kept
        level, message = teardown_report(self.pool.instances())
        if message:
            log.log(level, "%s", message)
        kept = self.pool.kept()
        if kept:
            log.warning("%s", kept_note(kept, time.time()))

    def _report_cost(self, outcome: str) -> None:
        """Printed when something was rented; written whenever a rent was tried, since the
        ledger then lists the run and `snakemake-vastai status` reads its end from here."""
        instances = self.pool.instances()
        if not instances:
            return
        excluded = self.pool.excluded.snapshot()
        cost = run_cost(self.run_id, instances, time.time(), excluded, outcome)
        path = cost.write(self.state_dir)
        if cost.instances:
            log.info("%s\n  (details: %s)", cost.render(), path)


def teardown_report(instances: list[Instance]) -> tuple[int, str]:
    """(log level, line) on what the teardown left: every instance that was or may have been
    created is confirmed gone, or these may still bill; "" when nothing was rented."""
    rented = [
        i
        for i in instances
        if i.instance_id or i.state is State.UNKNOWN or (i.creating and i.state is State.RENTING)
    ]
    kept = [i for i in rented if i.state is State.KEPT and i.kept_until is not None]
    doubtful = [i for i in rented if i.state is not State.GONE and i not in kept]
    if doubtful:
        return logging.ERROR, (
            f"{len(doubtful)} instance(s) of this run may still be billing "
            f"({', '.join(i.name for i in doubtful)}). Run 'snakemake-vastai reap' to destroy "
            "them."
        )
    if kept:
        gone = len(rented) - len(kept)
        return logging.INFO, (
            f"{len(kept)} instance(s) of this run kept warm (below) and {gone} destroyed; "
            "nothing else of it is billing."
        )
    if rented:
        return (
            logging.INFO,
            f"All {len(rented)} instance(s) of this run are destroyed; none is billing.",
        )
    return logging.INFO, ""


def returned_files(job: Any) -> tuple[list[str], list[str]]:
    """(outputs and benchmark files, logs) of a job or group job that come back over SSH;
    files in a storage provider travel there instead."""
    members = list(job.jobs) if job.is_group() else [job]
    outputs, logs = set(), set()
    for member in members:
        outputs.update(str(f) for f in member.output if not is_storage(f))
        logs.update(str(f) for f in member.log if not is_storage(f))
        benchmark = getattr(member, "benchmark", None)
        if benchmark and not is_storage(benchmark):
            outputs.add(str(benchmark))
    return sorted(outputs), sorted(logs)


def declared_files(jobs: list[Any]) -> set[str]:
    """Every local file a job of the workflow declares (inputs, outputs, logs, benchmarks),
    local rules and jobs already done included: none of them needs to be a shipped source.
    Read from the DAG of ``jobs`` (all of them share one)."""
    if not jobs:
        return set()
    found = set()
    for job in jobs[0].dag.jobs:
        outputs, logs = returned_files(job)
        found.update(outputs, logs, (str(f) for f in job.input if not is_storage(f)))
    return found


def job_tag(job: Any) -> str:
    """Label- and path-safe, unique per job attempt: rule-jobid-a<attempt>."""
    name = "group-" + str(job.jobid)[:8] if job.is_group() else f"{job.name}-{job.jobid}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-a{job.attempt}")


def describe(job: Any) -> str:
    if job.is_group():
        return f"group job {job.name} (rules {', '.join(sorted(job.rules))})"
    return f"rule {job.name} (jobid {job.jobid})"


def is_storage(path: Any) -> bool:
    return bool(getattr(path, "is_storage", False))
