"""Snakemake with timing probes on the plugin's steps: ``python -m benchmarks.tracer ARGS``.

Why probes instead of log timestamps: Snakemake stamps its messages to the second, and a warm
job's whole overhead is a fraction of a second, so the breakdown (staging, the job agent's
start, the remote run, receiving the results, how late the status loop notices, Snakemake's
own scheduling gap) needs the plugin's methods timed directly. The probes wrap methods from
outside, so the plugin itself stays untouched; each call becomes one JSON line in the file
named by ``$VASTAI_BENCH_TRACE``. A method the plugin no longer has is skipped with a
warning, never an error.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, TextIO

TRACE_ENV = "VASTAI_BENCH_TRACE"
PLUGIN = "snakemake_executor_plugin_vastai"

TagOf = Callable[[tuple[Any, ...]], str | None]
Detail = Callable[[tuple[Any, ...]], Any]  # JSON-able

_current = threading.local()  # the tag of the job this worker thread runs
# Spans that mark their thread as working for their job: a job's own thread, and the thread
# that prepares the instance rented for it (its boot wait, login and bootstrap).
THREAD_SPANS = ("job", "prepare_instance")


def _job_run_tag(args: tuple[Any, ...]) -> str:
    return args[0].spec.tag


def _job_info_tag(args: tuple[Any, ...]) -> str | None:
    return getattr(args[1], "external_jobid", None)


def _snakemake_job_tag(args: tuple[Any, ...]) -> str | None:
    from snakemake_executor_plugin_vastai.edge.run import job_tag

    return job_tag(args[1])


def _api_what(args: tuple[Any, ...]) -> str:
    return str(args[1])


def _rented_for(args: tuple[Any, ...]) -> str:
    """The tag of the job an instance was rented for: its label is
    ``snakemake-vastai:<run>:<tag>-<serial>``."""
    return str(args[1].label).rsplit(":", 1)[-1].rsplit("-", 1)[0]


def _instance_label(args: tuple[Any, ...]) -> str:
    return str(getattr(args[1], "label", ""))


def _usage(args: tuple[Any, ...]) -> dict[str, Any] | None:
    """What the job cost on its instance (``JobRun.usage``, set by ``_collect``)."""
    usage = args[0].usage
    return None if usage is None else dataclasses.asdict(usage)


def _frame_kind(args: tuple[Any, ...]) -> str:
    """The kind of an agent frame before the results: S started, L log, K keep-alive, X exit."""
    return bytes(args[1]).decode(errors="replace")


# (span name, module, class, method, tag of the call or None for the thread's job, detail).
# A detail is computed after the call returns (so ``collect`` sees the usage it set).
PROBES: tuple[tuple[str, str, str, str, TagOf | None, Detail | None], ...] = (
    ("run_job", "", "Executor", "run_job", _snakemake_job_tag, None),
    ("submitted", "", "Executor", "report_job_submission", _job_info_tag, None),
    ("reported_success", "", "Executor", "report_job_success", _job_info_tag, None),
    ("reported_error", "", "Executor", "report_job_error", _job_info_tag, None),
    ("job", ".edge.jobrun", "JobRun", "run", _job_run_tag, None),
    ("execute", ".edge.jobrun", "JobRun", "_execute", None, None),
    ("collect", ".edge.jobrun", "JobRun", "_collect", None, _usage),
    ("acquire", ".pool.placement", "Pool", "acquire", None, None),
    ("rent", ".pool.renter", "Renter", "rent", None, None),
    ("prepare_instance", ".pool.preparer", "Preparer", "prepare", _rented_for, None),
    ("release", ".pool.placement", "Pool", "release", None, None),
    ("destroy", ".pool.destroyer", "Destroyer", "finish", None, _instance_label),
    ("refresh", ".pool.placement", "Pool", "refresh", None, None),
    ("boot_wait", ".pool.preparer", "Preparer", "_wait_booted", None, None),
    ("connect", ".pool.instance", "Instance", "connect", None, None),
    ("bootstrap", ".pool.instance", "Instance", "bootstrap", None, None),
    ("stage", ".remote.staging", "Stager", "prepare", None, None),
    ("start", ".remote.jobwire", "RemoteJob", "start", None, None),
    ("frame", ".remote.jobwire", "RemoteJob", "_on_progress", None, _frame_kind),
    ("api", ".market.marketplace", "Marketplace", "_call", None, _api_what),
)


class TraceFile:
    """Appends one JSON line per probed call; shared by every thread."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, span: str, start: float, end: float, tag: str | None, detail: Any) -> None:
        line: dict[str, Any] = {"span": span, "start": start, "end": end, "tag": tag}
        line["thread"] = threading.current_thread().name
        if detail is not None:
            line["detail"] = detail
        with self._lock:
            self._stream.write(json.dumps(line, default=str) + "\n")
            self._stream.flush()


def probe(
    trace: TraceFile,
    span: str,
    fn: Callable[..., Any],
    tag_of: TagOf | None,
    detail_of: Detail | None,
) -> Callable[..., Any]:
    """``fn`` timed; a call with its own tag also marks its thread as working for that job."""

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        tag = _safe(tag_of, args) if tag_of else getattr(_current, "tag", None)
        if span in THREAD_SPANS:
            _current.tag = tag
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            trace.emit(span, start, time.time(), tag, _safe(detail_of, args))

    return timed


def install(trace: TraceFile) -> list[str]:
    """Wrap every probed method that exists; returns the ones that were missing."""
    missing = []
    for span, module_name, class_name, method, tag_of, detail_of in PROBES:
        try:
            module = importlib.import_module(PLUGIN + module_name)
            owner = getattr(module, class_name)
            fn = getattr(owner, method)
        except (ImportError, AttributeError):
            missing.append(f"{class_name}.{method}")
            continue
        setattr(owner, method, probe(trace, span, fn, tag_of, detail_of))
    return missing


def _safe(extract: Detail | None, args: tuple[Any, ...]) -> Any:
    if extract is None:
        return None
    try:
        return extract(args)
    except Exception:  # a probe must never break the run it measures
        return None


def main() -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
        missing = install(TraceFile(stream))
        if missing:
            warnings.warn(f"benchmark probes skipped: {', '.join(missing)}", stacklevel=1)
    from snakemake.cli import main as snakemake_main

    sys.argv[0] = "snakemake"
    snakemake_main()


if __name__ == "__main__":
    main()
