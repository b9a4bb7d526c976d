"""Snakemake that says at its end how many of the plugin's JobRun objects are still alive:
``python -m tests.jobrun_census ARGS`` (ARGS as for ``python -m snakemake``).

Why: a finished job's state must go once Snakemake has its outcome, or a long run's memory
grows with every job it ran. A weak reference to each JobRun sees that from outside: after
the executor's shutdown (every outcome reported, the status thread joined) and a garbage
collection, the JobRuns still alive are counted and printed on stderr (``MARKER``).
"""

from __future__ import annotations

import gc
import re
import sys
import weakref
from typing import Any

from tests.wrapped import snakemake_patched_by

MARKER = "jobrun-census"
_LINE = re.compile(rf"^{MARKER}: (\d+) alive of (\d+)$", re.MULTILINE)


def census(output: str) -> tuple[int, int]:
    """(alive, made) from a run's output."""
    (found,) = _LINE.findall(output)
    return int(found[0]), int(found[1])


def install() -> None:
    from snakemake_executor_plugin_vastai import Executor
    from snakemake_executor_plugin_vastai.edge.jobrun import JobRun

    alive: weakref.WeakSet[JobRun] = weakref.WeakSet()
    made = [0]
    init, shutdown = JobRun.__init__, Executor.shutdown

    def counted_init(run: JobRun, *args: Any, **kwargs: Any) -> None:
        init(run, *args, **kwargs)
        alive.add(run)
        made[0] += 1

    def counting_shutdown(executor: Executor) -> None:
        shutdown(executor)
        gc.collect()
        print(f"{MARKER}: {len(alive)} alive of {made[0]}", file=sys.stderr, flush=True)

    JobRun.__init__ = counted_init
    Executor.shutdown = counting_shutdown


if __name__ == "__main__":
    snakemake_patched_by(install)
