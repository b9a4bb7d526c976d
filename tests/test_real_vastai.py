"""End to end against the real Vast.ai: one job on the cheapest GPU it offers, then a check
with the plugin's own API client that nothing of the run is left.

It rents a real machine for a few minutes (a few cents at --vastai-max-price 0.5), so it runs
only on request:

    SNAKEMAKE_VASTAI_E2E=1 VAST_API_KEY=... .venv/bin/python -m pytest -m e2e

The key may also come from SNAKEMAKE_VASTAI_API_KEY or the vastai CLI's key file. Whatever
happens, the test destroys every instance its run left behind before it reports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastai.market.defaults import DEFAULT_API_URL
from snakemake_executor_plugin_vastai.market.marketplace import (
    AuthError,
    Marketplace,
    MarketplaceError,
    resolve_api_key,
)
from snakemake_executor_plugin_vastai.pool.ledger import Ledger, run_id_of
from tests.workflows import write_workflow

MAX_PRICE = 0.5
RUN_TIMEOUT_S = 45 * 60  # image pulls on Vast.ai can take many minutes
SNAKEFILE = """\
rule all:
    input: "gpu.txt"


rule gpu:
    output: "gpu.txt"
    resources: gpu=1
    shell: "nvidia-smi --query-gpu=name --format=csv,noheader > {output}"
"""


def real_api_key() -> str | None:
    """The key the plugin would use, or None (then the test is skipped)."""
    if os.environ.get("SNAKEMAKE_VASTAI_API_KEY"):
        return os.environ["SNAKEMAKE_VASTAI_API_KEY"].strip()
    try:
        return resolve_api_key(None)
    except AuthError:
        return None


API_KEY = real_api_key()

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get("SNAKEMAKE_VASTAI_E2E") != "1" or not API_KEY,
        reason="talks to the real Vast.ai and costs money: set SNAKEMAKE_VASTAI_E2E=1 and a key",
    ),
]


def real_env(api_key: str) -> dict[str, str]:
    """This environment aimed at the real API: no fake's URL may leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("VAST_URL", "SNAKEMAKE_VASTAI_API_URL")}
    env |= {"VAST_API_KEY": api_key, "PYTHONUNBUFFERED": "1"}
    return env


def run_ids(workdir: Path) -> set[str]:
    return {record.run_id for record in Ledger(workdir / ".snakemake" / "vastai").records()}


def destroy_leftovers(market: Marketplace, runs: set[str]) -> list[int]:
    """Destroy every instance labelled as one of ``runs``; returns their ids."""
    found = [i.id for i in market.list_instances() if run_id_of(i.label) in runs]
    for instance_id in found:
        try:
            market.destroy(instance_id)
        except MarketplaceError as error:  # still report the others; the assert names them
            print(f"could not destroy instance {instance_id}: {error}", file=sys.stderr)
    return found


def test_one_job_on_the_cheapest_gpu(tmp_path: Path) -> None:
    assert API_KEY is not None
    market = Marketplace(API_KEY, DEFAULT_API_URL)
    workdir = write_workflow(tmp_path / "wf", SNAKEFILE)
    command = [sys.executable, "-m", "snakemake", "--executor", "vastai", "--jobs", "1"]
    command += ["--vastai-max-price", str(MAX_PRICE), "--latency-wait", "10"]
    try:
        done = subprocess.run(
            command,
            cwd=workdir,
            env=real_env(API_KEY),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    finally:
        # Before any assertion: a failed or killed run must not keep billing.
        left = destroy_leftovers(market, run_ids(workdir))

    assert done.returncode == 0, done.stdout
    assert left == [], f"the run left instances {left} (destroyed by the test)"
    assert (workdir / "gpu.txt").read_text().strip(), "nvidia-smi printed no GPU"

    runs = run_ids(workdir)
    assert len(runs) == 1, runs
    records = Ledger(workdir / ".snakemake" / "vastai").records()
    assert records, "the run rented nothing"
    assert all(record.dph_total <= MAX_PRICE for record in records), records
    assert [record for record in records if record.open] == []
    assert [i.id for i in market.list_instances() if run_id_of(i.label) in runs] == []
