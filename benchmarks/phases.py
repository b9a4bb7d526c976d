"""Where a job's time goes, from the probes ``benchmarks.tracer`` wrote during a run.

Why per phase: a warm job's overhead is a few seconds spread over Snakemake (building the
job, scheduling the next one), the plugin (staging, fetching, noticing the end) and the
instance (the remote Snakemake's start-up). Only the split says which one to make faster.

Phases of one job, in order (seconds):

=================  ============================================================================
``build``          Snakemake's ``run_job`` up to the submission report (job spec, command line)
``dispatch``       submission report to the job's worker thread starting
``acquire``        the pool handing out an instance: ~0 warm; rent, boot, SSH, bootstrap cold
``stage``          sources and inputs into a fresh job directory on the instance
``start``          writing the job files and starting the detached job
``remote``         start to the job's exit being seen, split into ``remote_snakemake`` (the
                   remote Snakemake's own "Elapsed time", read from the job's log: Snakefile,
                   DAG, the job's ``sleep 1``, bookkeeping) and ``remote_other`` (the rest:
                   interpreter start and imports before that clock starts, exit, detection)
``collect``        last log read and fetching the outputs
``notice``         outcome ready to Snakemake's status loop reporting it
``schedule``       (chain only) success reported to the next job's ``run_job``: Snakemake's
                   bookkeeping and job selection
=================  ============================================================================

``release`` (back to the pool, or destroy with ``--vastai-pool-ttl 0``) runs after the outcome
is ready, alongside ``notice``, so it is listed but not on the job's critical path.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CRITICAL = ("build", "dispatch", "acquire", "stage", "start", "remote", "collect", "notice")
COLD_PARTS = ("rent", "boot_wait", "connect", "bootstrap")
ELAPSED = re.compile(r"Elapsed time: (\d+):(\d+):(\d+(?:\.\d+)?)")


@dataclass
class JobTrace:
    """The probed calls of one job, by span name (a span may repeat: ``stream_log``)."""

    tag: str
    spans: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    remote_elapsed: float | None = None  # the remote Snakemake's "Elapsed time"

    def first(self, span: str) -> tuple[float, float] | None:
        found = self.spans.get(span)
        return found[0] if found else None

    def duration(self, span: str) -> float | None:
        found = self.first(span)
        return None if found is None else found[1] - found[0]

    @property
    def cold(self) -> bool:
        return "rent" in self.spans

    def phases(self) -> dict[str, float] | None:
        """The job's critical-path phases; None if a probe is missing (a failed job)."""
        run_job, submitted = self.first("run_job"), self.first("submitted")
        job, execute = self.first("job"), self.first("execute")
        start, fetch = self.first("start"), self.first("fetch")
        success = self.first("reported_success")
        if None in (run_job, submitted, job, execute, start, fetch, success):
            return None
        phases = {
            "build": submitted[0] - run_job[0],
            "dispatch": job[0] - submitted[1],
            "acquire": self.duration("acquire") or 0.0,
            "stage": self.duration("stage") or 0.0,
            "start": start[1] - start[0],
            "remote": execute[1] - start[1],
            "collect": fetch[1] - execute[1],
            "notice": success[0] - fetch[1],
            "release": self.duration("release") or 0.0,
        }
        if self.remote_elapsed is not None:
            phases["remote_snakemake"] = self.remote_elapsed
            phases["remote_other"] = phases["remote"] - self.remote_elapsed
        if self.cold:
            phases |= {part: self.duration(part) or 0.0 for part in COLD_PARTS}
        return phases


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def job_traces(events: list[dict[str, Any]]) -> dict[str, JobTrace]:
    """The events that belong to a job, grouped by its tag."""
    jobs: dict[str, JobTrace] = {}
    for event in events:
        tag = event.get("tag")
        if tag is not None:
            span = (event["start"], event["end"])
            jobs.setdefault(tag, JobTrace(tag)).spans[event["span"]].append(span)
    return jobs


def remote_elapsed(log: Path) -> float | None:
    """The last "Elapsed time: H:MM:SS.ffffff" a remote Snakemake printed in its log."""
    if not log.exists():
        return None
    found = ELAPSED.findall(log.read_text(errors="replace"))
    if not found:
        return None
    hours, minutes, seconds = found[-1]
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def job_phases(path: Path, logs: Path, chained: bool) -> dict[str, Any] | None:
    """Mean phases of warm and cold jobs, and the API calls the plugin made, by purpose.
    ``logs`` is the workdir's ``.snakemake/auxiliary/vastai-logs`` (``<tag>.log`` per job)."""
    events = read_events(path)
    jobs = job_traces(events)
    if not jobs:
        return None
    for job in jobs.values():
        job.remote_elapsed = remote_elapsed(logs / f"{job.tag}.log")
    ordered = sorted(jobs.values(), key=lambda j: (j.first("run_job") or (0.0, 0.0))[0])
    rows: list[tuple[JobTrace, dict[str, float]]] = []
    for index, job in enumerate(ordered):
        phases = job.phases()
        if phases is None:
            continue
        following = ordered[index + 1].first("run_job") if index + 1 < len(ordered) else None
        success = job.first("reported_success")
        if chained and following is not None and success is not None:
            phases["schedule"] = following[0] - success[0]
        rows.append((job, phases))
    purposes = Counter(
        re.sub(r"\s*\d+", "", e.get("detail", "")) for e in events if e["span"] == "api"
    )
    return {
        "warm": _summarise([(j, p) for j, p in rows if not j.cold]),
        "cold": _summarise([(j, p) for j, p in rows if j.cold]),
        "api_calls_by_purpose": dict(sorted(purposes.items())),
        "api_calls_outside_jobs": sum(1 for e in events if e["span"] == "api" and not e["tag"]),
    }


def _summarise(rows: list[tuple[JobTrace, dict[str, float]]]) -> dict[str, Any] | None:
    """How many jobs, the mean of each phase and their sum along the critical path, and the
    API calls made on the jobs' own threads (rent, attach, destroy; the list calls that watch
    boots run on the status loop and count as outside jobs)."""
    if not rows:
        return None
    phases = [p for _, p in rows]
    names = list(dict.fromkeys(name for row in phases for name in row))
    mean = {n: round(statistics.fmean(row[n] for row in phases if n in row), 3) for n in names}
    return {
        "jobs": len(rows),
        "mean": mean,
        "critical_path": round(sum(mean.get(n, 0.0) for n in (*CRITICAL, "schedule")), 3),
        "api_calls_per_job": round(statistics.fmean(len(j.spans["api"]) for j, _ in rows), 3),
    }
