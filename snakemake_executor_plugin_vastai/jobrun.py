"""One job's way through an instance, on a worker thread: get an instance, ship, run, watch,
fetch, give the instance back. The status loop only reads the outcome.

Why a thread per job: renting and booting take minutes and transfers block; Snakemake's
``run_job`` must return at once and its status loop must stay responsive. The thread holds
no Snakemake objects, only the plain facts of the job, so nothing here races the scheduler.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from snakemake_executor_plugin_vastai.errors import VastaiError
from snakemake_executor_plugin_vastai.instance import Instance, InstanceFailure
from snakemake_executor_plugin_vastai.logger import get_logger
from snakemake_executor_plugin_vastai.pool import Cancelled, Placement, Pool
from snakemake_executor_plugin_vastai.remote import DetachedJob, RemoteError
from snakemake_executor_plugin_vastai.resources import ResourceRequest, Signature
from snakemake_executor_plugin_vastai.staging import (
    REMOTE_BASE,
    DigestCache,
    SourceBundle,
    Stager,
)

log = get_logger(__name__)

POLL_SECONDS = 0.05  # a local check of the waiter channel: no round trip
LOG_STREAM_SECONDS = 1.0
# How long a job may stay unreachable over SSH before the host counts as lost.
UNREACHABLE_SECONDS = 60.0


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
    return str(text).rstrip().rstrip(".") + ". "


class JobRun:
    def __init__(
        self,
        spec: JobSpec,
        pool: Pool,
        sources: Callable[[], SourceBundle],
        digests: DigestCache,
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.sources = sources
        self.digests = digests
        self.outcome: Outcome | None = None
        self.placement: Placement | None = None
        self._detached: DetachedJob | None = None
        self._cancelled = threading.Event()
        self._log_offset = 0

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
        if self._detached is not None:
            try:
                self._detached.kill()
            except (RemoteError, OSError) as error:
                log.debug("could not kill %s: %s", self.spec.name, error)

    def run(self) -> None:
        """The worker thread's body: never raises; always leaves an outcome, and only once the
        instance is back in the pool (or gone), so the next job Snakemake submits finds it."""
        healthy = False
        outcome = None
        try:
            self.placement = self.pool.acquire(self.spec.request, self.spec.tag, self.spec.counted)
            self._check_cancelled()
            exit_code = self._execute(self.placement)
            self._stream_log()
            if exit_code == 0:
                self._fetch(required=True)
                healthy = True
                outcome = Outcome(True)
            else:
                self._fetch(required=False)
                outcome = self._failure(
                    f"{self.spec.name} failed on {self.placement.instance.name} with exit "
                    f"code {exit_code}. {self._log_tail()}"
                )
        except (VastaiError, RemoteError, OSError) as error:
            if self._cancelled.is_set() or isinstance(error, Cancelled | JobCancelled):
                outcome = Outcome(False, sentence(f"{self.spec.name} was cancelled"), True)
            else:
                where = f" on {self.instance.name}" if self.instance else ""
                outcome = self._failure(sentence(f"{self.spec.name} failed{where}: {error}"))
        except Exception as error:  # a bug must fail the job, not hang the run
            log.exception("unexpected error in %s", self.spec.name)
            outcome = self._failure(f"{self.spec.name}: internal error: {error!r}. ")
        finally:
            try:
                if self.placement is not None:
                    self.pool.release(self.placement, healthy=healthy)
            finally:
                self.outcome = outcome or self._failure(f"{self.spec.name}: no outcome. ")

    # -- steps ---------------------------------------------------------------------------

    def _execute(self, placement: Placement) -> int:
        instance = placement.instance
        assert instance.host is not None
        stager = Stager(instance.host, instance.files, self.digests)
        stager.prepare(self.job_dir, self.sources(), self.spec.inputs)
        self._check_cancelled()
        self._detached = instance.host.start_detached(
            self.spec.command, self.job_dir, {**self.spec.env, **placement.lease.environment()}
        )
        started = time.monotonic()
        unreachable_since: float | None = None
        next_log = started
        while True:
            self._check_cancelled()
            if instance.lost_reason:
                raise InstanceFailure(
                    f"{instance.name} was lost while the job was running: {instance.lost_reason}"
                )
            try:
                exit_code = self._detached.poll()
                unreachable_since = None
            except RemoteError as error:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > UNREACHABLE_SECONDS:
                    raise InstanceFailure(
                        f"{instance.name} has been unreachable over SSH for "
                        f"{UNREACHABLE_SECONDS:.0f} s ({error})"
                    ) from None
                exit_code = None
            if exit_code is not None:
                return exit_code
            now = time.monotonic()
            if self.spec.max_runtime and now - started > self.spec.max_runtime:
                self._detached.kill()
                self._stream_log()
                raise JobFailed(
                    f"killed after exceeding --vastai-max-runtime ({self.spec.max_runtime:g} s)"
                )
            if now >= next_log and unreachable_since is None:
                self._stream_log()
                next_log = now + LOG_STREAM_SECONDS
            time.sleep(POLL_SECONDS)

    def _fetch(self, required: bool) -> None:
        assert self.instance is not None and self.instance.host is not None
        stager = Stager(self.instance.host, self.instance.files, self.digests)
        wanted = [*self.spec.outputs, *self.spec.logs] if required else list(self.spec.logs)
        stager.fetch(self.job_dir, wanted, optional=set(self.spec.logs))

    def _stream_log(self) -> None:
        """Append what the job printed since last time to the local log file."""
        if self.instance is None or self.instance.host is None or self._detached is None:
            return
        try:
            chunk = self.instance.host.read_from(self._detached.log_path, self._log_offset)
        except (RemoteError, OSError):
            return
        if chunk:
            self.spec.local_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spec.local_log, "ab") as handle:
                handle.write(chunk)
            self._log_offset += len(chunk)

    def _log_tail(self, lines: int = 20) -> str:
        if not self.spec.local_log.exists():
            return ""
        text = self.spec.local_log.read_text(errors="replace").splitlines()[-lines:]
        return "Last lines of the job's output:\n" + "\n".join(text) + "\n"

    def _failure(self, message: str) -> Outcome:
        logs = [str(self.spec.local_log)] if self.spec.local_log.exists() else []
        return Outcome(False, message, aux_logs=logs)

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise JobCancelled("cancelled")
