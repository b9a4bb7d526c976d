"""Packing, seen from outside: several jobs share one instance while its GPUs, cores, RAM and
disk suffice (on by default; ``--vastai-no-pack`` runs one job per instance at a time).

Judged three ways: the fake's ledger (what was rented), an instance token each job reads in
its instance's home (which jobs shared an instance), and what the jobs saw
(``CUDA_VISIBLE_DEVICES``, start and end times). Jobs that must run side by side meet at a
barrier in the instance's home first, so GPU hand-out is checked on jobs that really ran
at the same time, not on whatever the timing happened to be.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest

from tests.fakevast.harness import FakeVast
from tests.workflows import (
    INSTANCE_TOKEN,
    SnakemakeRun,
    assert_all_destroyed,
    result_files,
    run_local,
    run_snakemake,
    write_workflow,
)

DATA = Path(__file__).with_name("data")
FLAT_OFFERS = DATA / "offers-1gpu-flat.json"  # 12 x 1 GPU, 16 cores, 64 GB, $0.40/h
FOUR_GPU_OFFERS = DATA / "offers-4gpu-cheap.json"  # 1 x 4 GPUs at $0.60/h, 4 x 1 GPU at $0.90/h
FOUR_GPU_OFFER_ID = 9400001

RUN_TIMEOUT = 300  # seconds: a hang fails through the timeout, never a wall-time assertion
# --cores caps a job's threads (Snakemake clamps threads to it): with it unset, threads: 2
# would reach the plugin as 1.
CORES = ("--cores", "64")

# Packed jobs start side by side on a fresh instance, and INSTANCE_TOKEN's "make it if
# missing" is not atomic: two jobs could each make (and print) their own token. The lock
# makes the first one win for all.
TOKEN = f"flock \"$HOME/.instance-token.lock\" sh -c '{INSTANCE_TOKEN}'"


def barrier(count: int) -> str:
    """Shell that waits (up to 30 s) until ``count`` jobs on the same instance reached it.
    Each job must export BARRIER_NAME, a name of its own."""
    folder = f'"$HOME/.barrier-{uuid.uuid4().hex}"'
    return (
        f'mkdir -p {folder}; touch {folder}/"$BARRIER_NAME"; n=0; '
        f'while [ "$(ls {folder} | wc -l)" -lt {count} ] && [ $n -lt 300 ]; '
        "do sleep 0.1; n=$((n+1)); done"
    )


def run(workdir: Path, fake: FakeVast, *extra: str, jobs: int) -> SnakemakeRun:
    done = run_snakemake(workdir, fake, *CORES, *extra, jobs=jobs, timeout=RUN_TIMEOUT)
    assert done.ok, done.output
    return done


# -- 16 CPU-only jobs of 2 threads on 16-core instances -----------------------------------

CPU_JOBS = 16
CPU_SNAKEFILE = """\
localrules: all


rule all:
    input:
        expand("data/{{i}}.txt", i=range({count})),
        expand("where/{{i}}.txt", i=range({count})),


rule work:
    output: data="data/{{i}}.txt", where="where/{{i}}.txt"
    threads: 2
    resources: mem_mb=500, disk_mb=1000
    shell: {shell!r}
"""
# The data file is what is compared with a local run; the where file says where and when
# the job ran (instance token, start and end time), which a local run cannot match.
CPU_DATA = (
    "seq 1 {wildcards.i} > {output.data}; "
    "echo job {wildcards.i} threads {threads} >> {output.data}; "
)
CPU_REMOTE = (
    "start=$(date +%s.%N); sleep 1; "
    + CPU_DATA
    + f"({TOKEN}; echo $start; date +%s.%N) > {{output.where}}"
)
CPU_LOCAL = CPU_DATA + "echo local > {output.where}"


def cpu_workflow(target: Path, shell: str) -> Path:
    return write_workflow(target, CPU_SNAKEFILE.format(count=CPU_JOBS, shell=shell))


def where(workdir: Path, count: int) -> list[tuple[str, float, float]]:
    """(instance token, start, end) of each job, from its where file."""
    found = []
    for i in range(count):
        token, start, end = (workdir / f"where/{i}.txt").read_text().split()
        found.append((token, float(start), float(end)))
    return found


@pytest.mark.slow
def test_cpu_jobs_pack_onto_two_instances_and_match_a_local_run(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """16 jobs of 2 threads (no GPU, 500 MB each) at --jobs 16 on 16-core offers: eight fit
    on one instance, so at most two are rented (by the fake's ledger and by the jobs' own
    tokens); the data files are byte-identical to a local run's."""
    fake = fakevast_factory(boot_seconds=1, offers=FLAT_OFFERS)
    remote = cpu_workflow(tmp_path / "remote", CPU_REMOTE)
    local = cpu_workflow(tmp_path / "local", CPU_LOCAL)
    run_local(local, cores=2)

    run(remote, fake, jobs=CPU_JOBS)

    instances = assert_all_destroyed(fake, remote)
    assert len(instances) <= 2, instances
    tokens = {token for token, _, _ in where(remote, CPU_JOBS)}
    assert len(tokens) <= len(instances), tokens
    expected = result_files(local, "data")
    assert len(expected) == CPU_JOBS
    assert result_files(remote, "data") == expected


@pytest.mark.slow
def test_no_pack_runs_one_job_per_instance_at_a_time(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """The same 16 jobs with --vastai-no-pack: more than two instances are rented, and no
    two jobs ran on the same instance at the same time (by the jobs' own tokens and
    clocks)."""
    fake = fakevast_factory(boot_seconds=1, offers=FLAT_OFFERS)
    remote = cpu_workflow(tmp_path / "remote", CPU_REMOTE)

    run(remote, fake, "--vastai-no-pack", jobs=CPU_JOBS)

    instances = assert_all_destroyed(fake, remote)
    assert len(instances) > 2, instances
    by_token: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for token, start, end in where(remote, CPU_JOBS):
        by_token[token].append((start, end))
    for token, spans in by_token.items():
        spans.sort()
        for (_, end), (start, _) in pairwise(spans):
            assert end <= start, f"two jobs overlapped on instance {token}: {spans}"


# -- four 1-GPU jobs on one 4-GPU instance ------------------------------------------------

GPU_SNAKEFILE = """\
localrules: all


rule all:
    input: expand("gpu/{{i}}.txt", i=range(4))


rule gpu:
    output: "gpu/{{i}}.txt"
    resources: gpu=1, mem_mb=500, disk_mb=1000
    shell: {shell!r}
"""
# Snakemake runs shell commands under `set -u`: an unset variable shows as "unset".
SHOW_GPUS = (
    'printf \'%s\\n%s\\n\' "${{CUDA_VISIBLE_DEVICES-unset}}" "${{NVIDIA_VISIBLE_DEVICES-unset}}"'
)


def test_four_gpu_jobs_share_a_four_gpu_instance_one_gpu_each(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """Four gpu=1 jobs at --jobs 4; the cheapest offer has 4 GPUs, 1-GPU offers cost more:
    exactly one instance is rented (the 4-GPU one), the four jobs run on it side by side,
    each sees a different GPU in CUDA_VISIBLE_DEVICES, and NVIDIA_VISIBLE_DEVICES agrees."""
    fake = fakevast_factory(boot_seconds=1, offers=FOUR_GPU_OFFERS)
    shell = (
        f"export BARRIER_NAME=gpu{{wildcards.i}}; {barrier(4)}; "
        f"{SHOW_GPUS} > {{output}}; {TOKEN} >> {{output}}"
    )
    workdir = write_workflow(tmp_path / "wf", GPU_SNAKEFILE.format(shell=shell))

    run(workdir, fake, jobs=4)

    instances = assert_all_destroyed(fake, workdir)
    assert [row["offer_id"] for row in instances] == [FOUR_GPU_OFFER_ID], instances
    seen = [(workdir / f"gpu/{i}.txt").read_text().split("\n") for i in range(4)]
    cuda = sorted(lines[0] for lines in seen)
    assert cuda == ["0", "1", "2", "3"], seen
    assert all(lines[1] == lines[0] for lines in seen), seen
    assert len({lines[2] for lines in seen}) == 1, seen


# -- a GPU job and CPU jobs on one instance -----------------------------------------------

MIXED_SNAKEFILE = """\
localrules: all


rule all:
    input: "gpu.txt", expand("cpu/{{i}}.txt", i=range(3))


rule gpu_job:
    output: "gpu.txt"
    resources: gpu=1, mem_mb=500, disk_mb=1000
    shell: {gpu_shell!r}


rule cpu_job:
    output: "cpu/{{i}}.txt"
    threads: 2
    resources: mem_mb=500, disk_mb=1000
    shell: {cpu_shell!r}
"""


def test_gpu_and_cpu_jobs_share_one_instance(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """One gpu=1 job and three CPU-only jobs (2 threads each) at --jobs 4 on 1-GPU, 16-core
    offers: the GPU job takes the GPU, the CPU jobs take none, so all four run side by side
    on one instance (same token, one rent)."""
    fake = fakevast_factory(boot_seconds=1, offers=FLAT_OFFERS)
    meet = barrier(4)
    snakefile = MIXED_SNAKEFILE.format(
        gpu_shell=f"export BARRIER_NAME=gpu; {meet}; {TOKEN} > {{output}}",
        cpu_shell=f"export BARRIER_NAME=cpu{{wildcards.i}}; {meet}; {TOKEN} > {{output}}",
    )
    workdir = write_workflow(tmp_path / "wf", snakefile)

    run(workdir, fake, jobs=4)

    instances = assert_all_destroyed(fake, workdir)
    assert len(instances) == 1, instances
    outputs = ["gpu.txt", *(f"cpu/{i}.txt" for i in range(3))]
    tokens = {(workdir / path).read_text().split()[-1] for path in outputs}
    assert len(tokens) == 1, tokens
