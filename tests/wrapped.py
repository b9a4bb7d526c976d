"""Real Snakemake runs under a wrapper module that patches something in its process first
(``python -m tests.<wrapper> ARGS`` in place of ``python -m snakemake ARGS``), for the few
faults and probes that no switch of the fake marketplace reaches."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.fakevast.harness import FakeVast
from tests.workflows import REPO, SnakemakeRun, snakemake_command, snakemake_env


def run_wrapped(
    wrapper: str, workdir: Path, fake: FakeVast, *extra: str, jobs: int, timeout: float
) -> SnakemakeRun:
    """Snakemake as ``tests.workflows.run_snakemake`` runs it, under ``tests.<wrapper>``."""
    command = snakemake_command(fake, jobs, *extra)
    command[command.index("snakemake")] = f"tests.{wrapper}"
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = snakemake_env(fake) | {"PYTHONPATH": os.pathsep.join(paths)}
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=timeout,
    )  # fmt: skip
    return SnakemakeRun(done.returncode, done.stdout, time.monotonic() - started)


def snakemake_patched_by(install: Callable[[], None]) -> None:
    """A wrapper module's main: its patch first, then Snakemake's own command line."""
    install()
    from snakemake.cli import main as snakemake_main

    sys.argv[0] = "snakemake"
    snakemake_main()
