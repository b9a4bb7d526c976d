"""Snakemake executor plugin for Vast.ai: the glue between Snakemake's executor API and the
pool of rented instances. Only this module knows Snakemake's executor interface.

Importing it must stay cheap and side-effect free: Snakemake imports every installed executor
plugin on every start, whatever executor is used.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snakemake_interface_common.exceptions import ApiError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import CommonSettings

from snakemake_executor_plugin_vastai.base.errors import UserError, VastaiError
from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings
from snakemake_executor_plugin_vastai.edge.summary import FAILED, FINISHED, KILLED

if TYPE_CHECKING:
    from snakemake_executor_plugin_vastai.edge.jobrun import JobRun

__all__ = ["Executor", "ExecutorSettings", "common_settings"]

log = get_logger(__name__)

common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=True,
    # The plugin ships sources and files over SSH itself (can_transfer_local_files), so
    # Snakemake need not archive sources into a storage provider.
    job_deploy_sources=False,
    can_transfer_local_files=True,
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    # Secrets travel over SSH into a 0600 env file, never on the job's command line.
    pass_envvar_declarations_to_cmd=False,
    # The bootstrap installs the storage plugins in use, pinned to the local versions.
    auto_deploy_default_storage_provider=False,
    pass_group_args=True,
    init_seconds_before_status_checks=0,
)

# Signals that never interrupt a teardown once it has begun.
SHIELDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Status rounds read local state only (no API call); a job's outcome wakes the round at once,
# so this is only the longest a round waits.
STATUS_SECONDS = 1.0


class Executor(RemoteExecutor):
    # Made by the status loop in its own thread, which may start before __post_init__.
    _status_loop: asyncio.AbstractEventLoop | None = None
    _outcome_ready: asyncio.Event | None = None

    def __post_init__(self) -> None:
        from snakemake.settings.enums import Quietness

        from snakemake_executor_plugin_vastai.base.report import mark_progress
        from snakemake_executor_plugin_vastai.edge.run import RunContext
        from snakemake_executor_plugin_vastai.edge.snakemake_internals import storage_providers
        from snakemake_executor_plugin_vastai.remote.credentials import forwarded_environment

        mark_progress({"quietness": Quietness.PROGRESS})  # so that --quiet hides our lines
        settings: ExecutorSettings = self.workflow.executor_settings
        # The jobs whose outcome Snakemake has not had yet (for cancel_jobs): a job's state is
        # let go once it has, so a run holds at most --jobs of them, however many it runs.
        self._runs: set[JobRun] = set()
        self._runs_lock = threading.Lock()  # run_job, the status thread and cancel_jobs
        self._teardown_lock = threading.Lock()
        self._torn_down = False
        state_dir = Path(self.workflow.persistence.path) / "vastai"
        try:
            self.context = RunContext.start(
                settings=settings,
                state_dir=state_dir,
                envvars=forwarded_environment(
                    self.envvars(),
                    storage_providers(self.workflow),
                    automatic=not settings.no_forward_credentials,
                ),
                bootstrap_packages=self._storage_plugin_packages(),
                sources=self._source_lists,
                max_jobs=max(1, int(self.workflow.resource_settings.nodes or 1)),
                is_preemptible=self._preemptible_rule_test(),
            )
        except VastaiError as error:  # a bad option or key: stop before anything is rented
            self._stop_status_thread()
            raise user_error(error) from None
        except OSError as error:  # its state (ledger, lock, key) cannot be written there
            self._stop_status_thread()
            raise user_error(
                UserError(f"Cannot keep the run's state in {state_dir}: {error}")
            ) from None
        self._demand_counted = False
        self._cancelling = False
        self._stopped_by_error = False  # run_job stopped the whole run (no offer, ...)
        atexit.register(self._teardown, FAILED)  # only when Snakemake never shut us down
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._on_hangup)

    # -- Snakemake's executor interface --------------------------------------------------

    def run_job(self, job: JobExecutorInterface) -> None:
        from snakemake_executor_plugin_vastai.edge.jobrun import JobRun, sentence

        if not self._demand_counted:  # the DAG is complete when the first job is submitted
            self._demand_counted = True
            self._take_over_sigterm()
            remote = [j for j in self.dag.needrun_jobs() if not j.is_local]
            # what runs now first: when searches run short (a quota), its check comes first
            now = set(job.jobs) if job.is_group() else {job}
            remote.sort(key=lambda other: other not in now)
            self.context.plan(remote)
            try:
                self.context.check_before_renting(remote, Path.cwd())
                self.context.adopt_kept()  # what an earlier run kept warm needs no offer
                self.context.check_offers()  # last: the first rents reuse its searches
            except VastaiError as error:  # nothing is rented yet: stop the whole run
                self._stopped_by_error = True
                raise user_error(error) from None
        try:
            spec = self.context.job_spec(job, self.format_job_exec(job))
        except VastaiError as error:  # bad resources: fail this job, rent nothing
            self.report_job_error(SubmittedJobInfo(job, aux={}), msg=sentence(error))
            return
        run = JobRun(
            spec,
            self.context.pool,
            self.context.source_bundle,
            self.context.digests,
            self._wake_status_round,
        )
        with self._runs_lock:
            self._runs.add(run)
        self.report_job_submission(SubmittedJobInfo(job, external_jobid=spec.tag, aux={"run": run}))
        # A daemon thread per job (Snakemake caps them at --jobs): interpreter exit must
        # never wait for a boot in progress, or the atexit teardown would come too late.
        threading.Thread(target=run.run, name=f"vastai-{spec.tag}", daemon=True).start()

    async def check_active_jobs(self, active_jobs: list[SubmittedJobInfo]):
        # Only local state is read here: the reaper's thread makes the instance list call.
        context = getattr(self, "context", None)  # the status thread starts before __post_init__
        for job_info in active_jobs:
            run: JobRun = job_info.aux["run"]
            outcome = run.outcome
            if outcome is None:
                yield job_info
                continue
            with self._runs_lock:
                self._runs.discard(run)
            if outcome.success:
                self.report_job_success(job_info)
            elif outcome.cancelled and self._cancelling:
                continue  # not a failure: the user stopped it, and cancel_jobs named it
            else:
                context.pool.demand.returned(run.spec.counted)  # may be retried
                self.report_job_error(job_info, msg=outcome.message, aux_logs=outcome.aux_logs)

    async def sleep(self) -> None:
        """Wait for the next status round, but only until a job's outcome is ready: Snakemake
        hears of a finished job at once (a fixed tick cost a warm job 0.1 s on average)."""
        if self._outcome_ready is None:
            self._outcome_ready = asyncio.Event()
            self._status_loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._outcome_ready.wait(), STATUS_SECONDS)
        self._outcome_ready.clear()

    def _stop_status_thread(self) -> None:
        """Before a start that failed raises: Snakemake never shuts down an executor whose
        start failed, and its status thread, left looping, printed a stray "cannot schedule
        new futures after shutdown" under the error once Snakemake's thread pool was gone."""
        with self.lock:
            self.wait = False
        self._wake_status_round()
        self.wait_thread.join(timeout=2 * STATUS_SECONDS)

    def _wake_status_round(self) -> None:
        """Called from a job's thread; the status loop runs in another thread's event loop."""
        loop, event = self._status_loop, self._outcome_ready
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(event.set)

    def additional_general_args(self) -> str:
        # Snakemake's default --max-jobs-per-timespan (100/1s) leaves a non-daemon 1 s timer
        # behind every scheduling round, so each remote job's process lingered up to a second
        # after its work was done. A zero timespan lets it exit at once (measured: about 1 s
        # less per job, no busy loop).
        return "--max-jobs-per-timespan 1000/0s"

    def cancel_jobs(self, active_jobs: list[SubmittedJobInfo]) -> None:
        """Teardown first: every destroy goes out at once; the remote jobs are killed
        alongside, best effort, and never hold the destroys up. ``active_jobs`` can be
        partial (it is empty during a status round), so all of ours are cancelled."""
        self._cancelling = True
        with self._runs_lock:
            running = [run for run in self._runs if run.outcome is None]
        for run in running:
            run.cancel()
        for run in running:
            threading.Thread(target=run.kill_remote, name="vastai-kill", daemon=True).start()
        if running:
            names = ", ".join(run.spec.name for run in running)
            log.info(
                "Cancelled %d job(s): %s. Destroying the run's instances.", len(running), names
            )
        # Snakemake cancels from its handler of what stopped it: a signal (Ctrl-C, and
        # SIGTERM through _on_terminate) is a kill; any other exception, a failure.
        stopped_by = sys.exc_info()[1]
        self._teardown(KILLED if isinstance(stopped_by, KeyboardInterrupt) else FAILED)

    def shutdown(self) -> None:
        super().shutdown()
        self._teardown(FAILED if self._run_failed() else FINISHED)

    def _run_failed(self) -> bool:
        """Snakemake's own verdict: a job that failed with no retry left (local jobs and
        --keep-going included), or an error of ours that stopped the run."""
        scheduler = getattr(self.workflow, "scheduler", None)
        return self._stopped_by_error or bool(getattr(scheduler, "failed", None))

    # -- helpers -------------------------------------------------------------------------

    def _teardown(self, outcome: str) -> None:
        """The one way out, whatever triggered it: idempotent, never raises. ``outcome`` is
        how the run ended, for its summary (the first caller's word counts)."""
        with self._teardown_lock:
            if self._torn_down or not hasattr(self, "context"):
                return
            self._torn_down = True
        shielded = self._shield_teardown()
        try:
            self.context.close(outcome)
        except Exception as error:
            log.error(
                "Tearing down the Vast.ai instances failed: %s. Run 'snakemake-vastai "
                "reap' to destroy what may be left.",
                error,
            )
        finally:
            for signum, handler in shielded.items():
                signal.signal(signum, handler)

    def _shield_teardown(self) -> dict[int, Any]:
        """While the teardown runs, a second Ctrl-C, SIGTERM or SIGHUP (a user closing the
        terminal after Ctrl-C) is said and ignored: interrupting it would skip destroys and
        the settling of lost creates. Returns the handlers to put back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, self._during_teardown) for signum in SHIELDED}

    def _during_teardown(self, signum: int, frame: object) -> None:
        log.warning(
            "%s: still destroying this run's Vast.ai instances; that is not interrupted (it "
            "ends within %.0f s)",
            signal.Signals(signum).name,
            self.context.pool.teardown_left(),
        )

    def _take_over_sigterm(self) -> None:
        """SIGTERM stops the run at once, like Ctrl-C, instead of Snakemake's graceful wait
        for running jobs while their instances bill. Snakemake installs its own handler
        after the executor is built, so this runs at the first submission (main thread)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_terminate)

    def _on_terminate(self, signum: int, frame: object) -> None:
        if self._cancelling or self._torn_down:
            return  # already on the way out: never interrupt the teardown itself
        log.warning("SIGTERM: cancelling the run and destroying its Vast.ai instances")
        raise KeyboardInterrupt  # Snakemake's own cancel path: cancel_jobs, then shutdown

    def _on_hangup(self, signum: int, frame: object) -> None:
        if self._torn_down:
            return  # the teardown has run or runs: never interrupt it
        log.warning("SIGHUP: destroying every Vast.ai instance of this run")
        self._teardown(KILLED)
        raise SystemExit(128 + signum)

    def _source_lists(self) -> tuple[list[str], list[str]]:
        """(essential sources, other git-tracked sources) of the workflow.

        Essential is what Snakemake itself always ships: included Snakefiles, scripts and
        notebooks with their folders, conda env files and config files.
        """
        essential = [self.workflow.main_snakefile, *self.workflow.included]
        for rule in self.workflow.rules:
            for name in (rule.script or rule.notebook, rule.conda_env):
                if isinstance(name, str) and local_path(name) is not None:
                    path = Path(rule.basedir.join(name).get_path_or_uri(secret_free=True))
                    essential.append(str(path))
                    if name != rule.conda_env:
                        essential.extend(str(p) for p in path.parent.rglob("*") if p.is_file())
        essential.extend(self.workflow.configfiles)
        return relative_paths(essential), relative_paths(self.dag.get_sources())

    def _preemptible_rule_test(self) -> Callable[[str], bool] | None:
        """Snakemake's --preemptible-rules (not in the executor interface: read defensively)."""
        rules = getattr(self.workflow.remote_execution_settings, "preemptible_rules", None)
        return getattr(rules, "is_preemptible", None)

    def _storage_plugin_packages(self) -> tuple[str, ...]:
        """Every storage plugin the workflow uses, pinned to the version here. One that is no
        installed package here (a module on the path) has no version to pin nor any other
        to choose: the image must bring it."""
        from snakemake_executor_plugin_vastai.edge.snakemake_internals import storage_providers

        packages = []
        for provider in storage_providers(self.workflow):
            package = f"snakemake-storage-plugin-{provider.replace('_', '-')}"
            try:
                packages.append(f"{package}=={version(package)}")
            except PackageNotFoundError:
                log.warning(
                    "The storage plugin %s is not an installed package here, so it is not "
                    "installed on the instances; the image must have it",
                    provider,
                )
        return tuple(packages)


def user_error(error: VastaiError) -> ApiError:
    """The error that stops the run for a user's mistake, as Snakemake prints it: an ApiError
    as ``Error: <message>``. A WorkflowError would end with the frames that raised it (this
    module's), which tell a user nothing and look like a crash."""
    return ApiError(str(error))


def local_path(path: object) -> str | None:
    """The local path of a source file, or None for a remote one (URL, storage query)."""
    getter = getattr(path, "get_path_or_uri", None)
    text = str(getter(secret_free=True) if getter else path)
    return None if re.match(r"^[a-z][a-z0-9+.-]*://", text) else text


def relative_paths(paths: Iterable[object]) -> list[str]:
    found = set()
    for path in paths:
        text = local_path(path)
        if text is not None:
            found.add(os.path.relpath(text) if os.path.isabs(text) else os.path.normpath(text))
    return sorted(found)
