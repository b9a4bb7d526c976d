"""One job's way through an instance, on a worker thread: get an instance, ship, run, watch,
fetch, give the instance back. The status loop only reads the outcome.

Why a thread per job: renting and booting take minutes and transfers block; Snakemake's
``run_job`` must return at once and its status loop must stay responsive. The thread holds
no Snakemake objects, only the plain facts of the job, so nothing here races the scheduler.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from snakemake_executor_plugin_vastai.base.errors import HostError, VastaiError
from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.base.report import transfer
from snakemake_executor_plugin_vastai.edge.startchecks import unshipped_files
from snakemake_executor_plugin_vastai.market.request import ResourceRequest, Signature
from snakemake_executor_plugin_vastai.pool.instance import Instance, InstanceFailure
from snakemake_executor_plugin_vastai.pool.placement import Placement, Pool
from snakemake_executor_plugin_vastai.pool.progress import short_name
from snakemake_executor_plugin_vastai.pool.table import Cancelled
from snakemake_executor_plugin_vastai.remote.jobwire import (
    JobExit,
    JobRequest,
    RemoteJob,
    StreamLost,
    append_log,
    last_lines,
    missing_paths,
    name_some,
    own_error,
)
from snakemake_executor_plugin_vastai.remote.ssh import HostKeyMismatch, RemoteError, error_detail
from snakemake_executor_plugin_vastai.remote.staging import (
    REMOTE_BASE,
    DigestCache,
    SourceBundle,
    Stager,
    StagingError,
)

log = get_logger(__name__)

# How long one blocking read for the job's end lasts before the thread looks at cancellation,
# a lost host and the runtime cap (the end itself is seen the moment it arrives).
WAIT_SLICE_SECONDS = 0.5
# How long a job may stay unreachable over SSH before the host counts as lost.
UNREACHABLE_SECONDS = 60.0
# Lines read from the end of a failed job's log to find its own error among the remote
# Snakemake's shutdown lines.
LOG_LINES_READ = 400


@dataclass(frozen=True)
class JobSpec:
    """The plain facts of one Snakemake job (or group job)."""

    name: str  # for messages: "rule train (jobid 3)"
    tag: str  # label- and path-safe, unique in the run
    request: ResourceRequest
    command: str
    env: dict[str, str]
    inputs: list[str]
    outputs: list[str]  # outputs, benchmarks: must exist after success
    logs: list[str]  # fetched whenever present, also after a failure
    local_log: Path
    max_runtime: float  # 0: no cap
    counted: tuple[Signature, ...] = ()  # the member jobs' signatures in the workflow demand


@dataclass(frozen=True)
class RemoteUsage:
    """What one job cost on its instance, as its agent reported it."""

    job_cpu_seconds: float | None  # the job's processes (Snakemake and its shell)
    agent_cpu_seconds: float | None  # staging, waiting, sending the results
    uploaded_bytes: int
    downloaded_bytes: int


@dataclass(frozen=True)
class Outcome:
    success: bool
    message: str = ""
    cancelled: bool = False  # the run was stopped: not the job's failure
    aux_logs: list[str] = field(default_factory=list)


class JobFailed(VastaiError):
    pass


class JobCancelled(VastaiError):
    """The run was cancelled while this job waited or ran."""


def sentence(text: object) -> str:
    """Text as a sentence that Snakemake can append its own to ("... . For further...")."""
    text = str(text).rstrip()
    return text + " " if text.endswith(("?", "!")) else text.rstrip(".") + ". "


class JobRun:
    def __init__(
        self,
        spec: JobSpec,
        pool: Pool,
        sources: Callable[[], SourceBundle],
        digests: DigestCache,
        on_outcome: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_outcome`` is called (from this job's thread) once the outcome is set."""
        self.spec = spec
        self.pool = pool
        self.on_outcome = on_outcome
        self.sources = sources
        self.digests = digests
        self.outcome: Outcome | None = None
        self.placement: Placement | None = None
        self._remote: RemoteJob | None = None
        self._cancelled = threading.Event()
        self._killed_for_runtime = False
        self._runner_noted = False
        self._uploaded_bytes = 0
        self.usage: RemoteUsage | None = None

    @property
    def job_dir(self) -> str:
        return f"{REMOTE_BASE}/jobs/{self.spec.tag}"

    @property
    def instance(self) -> Instance | None:
        return self.placement.instance if self.placement else None

    def cancel(self) -> None:
        """Mark the job cancelled: it stops at its next step (no SSH here, so a teardown is
        never held up by an unreachable host)."""
        self._cancelled.set()

    def kill_remote(self) -> None:
        """Best effort, alongside teardown: end the job's processes on the instance."""
        if self._remote is not None:
            try:
                self._remote.kill()
            except (RemoteError, OSError) as error:
                log.debug("could not kill %s: %s", self.spec.name, error)

    def run(self) -> None:
        """The worker thread's body: never raises; always leaves an outcome, and only once the
        instance is back in the pool (or gone), so the next job Snakemake submits finds it.
        Snakemake waits for the outcome and the pool for the share: a thread that ended
        without either would hang the run."""
        healthy = False
        host_fault = ""
        outcome = None
        try:
            # An earlier run's job of the same tag left its log here: never shown as this one's.
            self.spec.local_log.unlink(missing_ok=True)
            self.placement = self.pool.acquire(self.spec.request, self.spec.tag, self.spec.counted)
            self._check_cancelled()
            ended = self._execute(self.placement)
            self._collect()
            if self._killed_for_runtime:
                raise JobFailed(
                    f"killed after exceeding --vastai-max-runtime ({self.spec.max_runtime:g} s)"
                )
            if ended.code == 0:
                healthy = True
                outcome = Outcome(True)
            else:
                outcome = self._failure(
                    f"{self.spec.name} failed on {self.placement.instance.name} with exit "
                    f"code {ended.code}. {self._unshipped_hint()}{self._log_tail()}"
                )
        except (VastaiError, OSError) as error:
            if self._cancelled.is_set() or isinstance(error, Cancelled | JobCancelled):
                outcome = Outcome(False, sentence(f"{self.spec.name} was cancelled"), True)
                healthy = True  # says nothing of its instance: the teardown ends that
            else:
                outcome = self._failure(sentence(f"{self.spec.name} failed{self._where(error)}"))
                if isinstance(error, HostError) and self._host_to_blame():
                    host_fault = f"{self.spec.name} failed on it: {error}"
        except Exception as error:  # a bug must fail the job, not hang the run
            log.exception("unexpected error in %s", self.spec.name)
            outcome = self._failure(f"{self.spec.name}: internal error: {error!r}. ")
        finally:
            self._close_stream()
            self._give_back(healthy, host_fault)
            self.outcome = outcome or Outcome(False, f"{self.spec.name}: no outcome. ")
            self.on_outcome()

    def _close_stream(self) -> None:
        """Best effort: by now the results are here or the job has failed, so a close that
        raises (paramiko's EOFError or SSHException on a connection that broke under it)
        changes nothing for the job and must never keep its share from going back."""
        if self._remote is None:
            return
        try:
            self._remote.close()
        except Exception as error:
            log.debug("%s: closing its stream failed: %r", self.spec.name, error)

    def _give_back(self, healthy: bool, host_fault: str) -> None:
        """The share back to the pool; a failure here is a bug, logged, and the job's outcome
        still goes to Snakemake."""
        if self.placement is None:
            return
        try:
            self.pool.release(self.placement, healthy, host_fault)
        except Exception:
            log.exception("%s: giving back its share failed", self.spec.name)

    # -- steps ---------------------------------------------------------------------------

    def _execute(self, placement: Placement) -> JobExit:
        """Stage and start the job in one round trip, then wait for its end (the agent's
        stream reports it; a lost stream is re-attached while the host is reachable)."""
        instance = placement.instance
        assert instance.host is not None
        staged = Stager(instance.host, instance.files, self.digests).prepare(
            self.sources(), self.spec.inputs
        )
        self._uploaded_bytes = staged.uploaded_bytes
        where = f"to {short_name(instance)} for {self.spec.tag}"
        transfer("Uploaded", staged.uploaded_bytes, staged.upload_seconds, where)
        self._check_cancelled()
        plan = self.pool.config.bootstrap
        request = JobRequest(self.job_dir, tuple(self.spec.outputs), tuple(self.spec.logs))
        self.spec.local_log.parent.mkdir(parents=True, exist_ok=True)
        self.spec.local_log.write_bytes(b"")  # this attempt's output only
        self._remote = RemoteJob(instance.host, plan.agent_command, request, self._append_log)
        env = {**self.spec.env, **placement.lease.environment()}
        self._remote.start(request.start(staged, env, self.spec.command, plan.runner_prefix))
        started = time.monotonic()
        unreachable_since: float | None = None
        while True:
            self._check_cancelled()
            if instance.lost_reason:
                raise InstanceFailure(
                    f"{instance.name} was lost while the job was running: {instance.lost_reason}"
                )
            try:
                ended = self._remote.wait(WAIT_SLICE_SECONDS)
                unreachable_since = None
            except StreamLost as error:
                unreachable_since = unreachable_since or time.monotonic()
                self._reattach(instance, unreachable_since, error)
                continue
            self._note_runner(instance)
            if ended is not None:
                return ended
            over = self.spec.max_runtime and time.monotonic() - started > self.spec.max_runtime
            if over and not self._killed_for_runtime:
                self._killed_for_runtime = True
                self._remote.kill()

    def _reattach(self, instance: Instance, since: float, error: RemoteError) -> None:
        """A new agent for the running job, or InstanceFailure once the host has been
        unreachable for UNREACHABLE_SECONDS."""
        assert self._remote is not None
        if time.monotonic() - since > UNREACHABLE_SECONDS:
            raise InstanceFailure(
                f"{instance.name} has been unreachable over SSH for "
                f"{UNREACHABLE_SECONDS:.0f} s ({error_detail(error, instance.name)})"
            )
        try:
            self._remote.reattach()
        except HostKeyMismatch as changed:  # another machine, or someone in between: never wait
            raise InstanceFailure(f"{changed}; the host is given up") from None
        except RemoteError as failed:  # still unreachable (the reconnect took its budget)
            log.debug("%s: re-attaching failed: %s", self.spec.name, failed)

    def _note_runner(self, instance: Instance) -> None:
        """Say once per job why it ran as a plain process, if it did."""
        assert self._remote is not None
        if self._remote.runner_note and not self._runner_noted:
            self._runner_noted = True
            log.info(
                "%s: %s runs as a plain process: %s",
                instance.name,
                self.spec.name,
                self._remote.runner_note,
            )

    def _collect(self) -> None:
        """The results: outputs and logs after success, logs only after a failure. A required
        output that is missing or was refused (not a regular file, a link out of its directory
        output) fails the job, naming it."""
        assert self._remote is not None and self.instance is not None
        started = time.monotonic()
        deadline = started + UNREACHABLE_SECONDS
        while True:
            try:
                results = self._remote.results(self.digests)
                break
            except StreamLost as error:
                if time.monotonic() > deadline:
                    raise
                self._reattach(self.instance, deadline - UNREACHABLE_SECONDS, error)
        where = f"from {short_name(self.instance)} for {self.spec.tag}"
        transfer("Downloaded", results.downloaded_bytes, time.monotonic() - started, where)
        self.instance.files.remember(digest for _, digest in results.stored)
        exit_code = self._remote.exit.code if self._remote.exit else None
        self.usage = RemoteUsage(
            self._remote.exit.cpu_seconds if self._remote.exit else None,
            results.agent_cpu_seconds,
            self._uploaded_bytes,
            results.downloaded_bytes,
        )
        log.debug("%s on %s: %s", self.spec.name, self.instance.name, self.usage)
        optional = set(self.spec.logs)
        refused = [r for r in results.refused if r["path"] not in optional]
        for entry in results.refused:
            if entry["path"] in optional:
                log.warning("%s: log %s not fetched: %s", self.spec.name, *entry.values())
        if exit_code == 0 and (results.missing or refused):
            problems = [f"'{p}' (missing)" for p in results.missing] + [
                f"'{r['path']}' ({r['reason']})" for r in refused
            ]
            raise StagingError(
                f"the job finished, but some of its outputs could not come back from the "
                f"instance: {name_some(problems)}"
            )

    def _host_to_blame(self) -> bool:
        """Whether the job's failure says something about its machine: not when the run's
        own silence (a computer asleep) let the instance's dead-man switch end it."""
        return self.instance is None or self.instance.loss_blames_host(time.time())

    def _where(self, error: BaseException) -> str:
        """The end of a failure message: the error, naming the instance once (many errors
        name it already)."""
        if self.instance is None:
            return f": {error}"
        name = self.instance.name
        detail = error_detail(error, name)
        return f": {detail}" if name in detail else f" on {name}: {detail}"

    def _append_log(self, chunk: bytes) -> None:
        append_log(self.spec.local_log, chunk)  # capped: the host decides how much comes

    def _log_tail(self, lines: int = 20) -> str:
        """The end of the job's own error; the rest of its output stays in its log file."""
        text = own_error(last_lines(self.spec.local_log, LOG_LINES_READ), lines)
        return "Last lines of the job's output:\n" + "\n".join(text) + "\n" if text else ""

    def _unshipped_hint(self) -> str:
        """The files the job's log says were missing that exist here but went neither as a
        source nor as an input (so the fix is here, not on the host), with that fix."""
        said = missing_paths(last_lines(self.spec.local_log, LOG_LINES_READ), self.job_dir)
        here = [path for path in said if os.path.isfile(path)]
        missing = unshipped_files(here, self.sources().files, self.spec.inputs)
        if not missing:
            return ""
        one = len(missing) == 1
        return (
            f"{name_some(missing)} {'exists' if one else 'exist'} here but "
            f"{'was' if one else 'were'} not shipped: `git add` {'it' if one else 'them'} or "
            f"name {'it' if one else 'them'} in `--vastai-deploy-paths`. "
        )

    def _failure(self, message: str) -> Outcome:
        logs = [str(self.spec.local_log)] if self.spec.local_log.is_file() else []
        return Outcome(False, message, aux_logs=logs)

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise JobCancelled("cancelled")
