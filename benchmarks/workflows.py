"""The benchmark workflows, generated as Snakefiles in fresh git repositories.

Why generated: the job count is a parameter (``--quick`` shrinks it), and every case gets its
own workdir so that no output, ledger or pool state leaks from one case into the next. The
workdir is a git repository because the plugin ships git-tracked sources, as for a user.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

GIT_TIMEOUT = 60.0
# Seconds each job sleeps: 1 s jobs for the chain and the fanout, as the issue states them;
# 0.1 s jobs where the plugin's own cost should dominate (the remote CPU figure, the load case);
# 0.05 s for the scale case, whose thousands of jobs measure the controller, not the jobs;
# 1 s for the rerun loop's GPU jobs, like the chain's: its figures are the boots it saves;
# 1 s for the pause case's two GPU jobs too: its figures are the idle gap between them.
SLEEP_SECONDS = {
    "chain": 1,
    "fanout": 1,
    "tiny": 0.1,
    "load": 0.1,
    "scale": 0.05,
    "rerun": 1,
    "pause": 1,
}
LOAD_SLEEP_SECONDS = SLEEP_SECONDS["load"]
SEQUENTIAL = ("chain", "tiny")  # each job needs the previous one's output

_CHAIN = """\
# {name}: {jobs} dependent jobs; each sleeps {sleep} s, then copies its input to its output.
localrules: all


rule all:
    input:
        "{name}/{jobs}.txt",


def previous(wildcards):
    i = int(wildcards.i)
    return "seed.txt" if i == 1 else f"{name}/{{i - 1}}.txt"


rule step:
    input:
        previous,
    output:
        "{name}/{{i}}.txt",
    wildcard_constraints:
        i=r"\\d+",
    shell:
        "sleep {sleep}; cat {{input}} > {{output}}; echo {{wildcards.i}} >> {{output}}"
"""

_FANOUT = """\
# fanout: {jobs} independent jobs; each sleeps {sleep} s, then writes its output.
localrules: all


rule all:
    input:
        expand("fan/{{i}}.txt", i=range(1, {jobs} + 1)),


rule work:
    output:
        "fan/{{i}}.txt",
    shell:
        "sleep {sleep}; echo {{wildcards.i}} > {{output}}"
"""

# One GPU, stated rather than left to the plugin's default, so that what a job takes of an
# instance does not change with that default; small mem_mb and disk_mb, as a tiny job would
# declare (Snakemake's default for a job without input, disk_mb=50000, would fill an instance's
# disk with one job and leave the packer nothing to share). The scale case is the same shape.
_LOAD = """\
# {name}: {jobs} independent jobs; each sleeps {sleep} s, then writes a small output.
localrules: all


rule all:
    input:
        expand("{name}/{{i}}.txt", i=range(1, {jobs} + 1)),


rule work:
    output:
        "{name}/{{i}}.txt",
    resources:
        gpu=1,
        mem_mb=1000,
        disk_mb=1000,
    shell:
        "sleep {sleep}; echo {name} {{wildcards.i}} > {{output}}"
"""

# The edit-and-rerun loop (tests/test_keep_warm.py's workflow, with the jobs' sleep): the
# evaluations read scripts/evaluate.sh, so editing it reruns them and nothing else.
_RERUN = """\
# rerun: a local prepare, a GPU train, {jobs} GPU evaluations that read scripts/evaluate.sh;
# each GPU job sleeps {sleep} s first.
localrules: all, prepare


rule all:
    input:
        expand("eval/{{i}}.txt", i=range(1, {jobs} + 1)),


rule prepare:
    output:
        "data.txt",
    shell:
        "echo prepared > {{output}}"


rule train:
    input:
        "data.txt",
    output:
        "model.txt",
    resources:
        gpu=1,
    shell:
        "sleep {sleep}; cat {{input}} > {{output}}"


rule evaluate:
    input:
        "model.txt",
        "scripts/evaluate.sh",
    output:
        "eval/{{i}}.txt",
    resources:
        gpu=1,
    shell:
        "sleep {sleep}; sh scripts/evaluate.sh {{wildcards.i}} > {{output}}"
"""
EVALUATE = 'echo "score of $1: 0.5"\n'
EVALUATE_EDITED = 'echo "score of $1: 0.75 (fixed)"\n'

# The idle gap: a GPU job, a local job that sleeps the gap (``--config gap=S``: a user's
# local step, a download, a review), then a GPU job of the same kind (the same resources and
# image). The local job writes its end (epoch) into its output, from which the second GPU
# job's wait is measured. disk_mb as a small job would declare: each instance gets the
# plugin's default disk, whichever mode rents it.
_PAUSE = """\
# pause: a GPU job, a local job that sleeps config["gap"] s, then a GPU job of the same kind;
# each GPU job sleeps {sleep} s.
localrules: all, wait


rule all:
    input:
        "pause/2.txt",


rule first:
    output:
        "pause/1.txt",
    resources:
        gpu=1,
        disk_mb=1000,
    shell:
        "sleep {sleep}; echo first > {{output}}"


rule wait:
    input:
        "pause/1.txt",
    output:
        "{waited}",
    shell:
        "sleep {{config[gap]}}; date +%s.%N > {{output}}"


rule second:
    input:
        "pause/1.txt",
        "{waited}",
    output:
        "pause/2.txt",
    resources:
        gpu=1,
        disk_mb=1000,
    shell:
        "sleep {sleep}; cat {{input[0]}} > {{output}}; echo second >> {{output}}"
"""
PAUSE_WAITED = "pause/waited.txt"  # the local job's output: the epoch its sleep ended

_TEMPLATES = {
    "chain": _CHAIN,
    "tiny": _CHAIN,
    "fanout": _FANOUT,
    "load": _LOAD,
    "scale": _LOAD,
    "rerun": _RERUN,
    "pause": _PAUSE,
}


@dataclass(frozen=True)
class Workflow:
    """One benchmark workflow: which shape, how many remote jobs, how many at once."""

    name: str  # "chain", "tiny", "fanout", "load", "scale", "rerun" or "pause"
    # Jobs that run remotely; the target rule `all` is local and not counted. "rerun": its
    # evaluations, the jobs its rerun runs (the first run also runs train, once). "pause":
    # its two GPU jobs (the local wait between them is not counted).
    jobs: int
    parallel: int  # --jobs for the executor, --cores for plain local Snakemake

    @property
    def sequential(self) -> bool:
        """One job at a time, each waiting for the previous one (chain, tiny)."""
        return self.name in SEQUENTIAL

    @property
    def outputs(self) -> list[str]:
        """Each job's output, in the order a sequential workflow makes them."""
        folder = {"fanout": "fan", "rerun": "eval"}.get(self.name, self.name)
        return [f"{folder}/{i}.txt" for i in range(1, self.jobs + 1)]

    def snakefile(self) -> str:
        sleep = SLEEP_SECONDS[self.name]
        return _TEMPLATES[self.name].format(
            name=self.name, jobs=self.jobs, sleep=sleep, waited=PAUSE_WAITED
        )

    def files(self) -> dict[str, str]:
        files = {"Snakefile": self.snakefile()}
        if self.sequential:
            files["seed.txt"] = "seed\n"
        if self.name == "rerun":
            files["scripts/evaluate.sh"] = EVALUATE
        return files

    def create(self, target: Path) -> Path:
        """Write the workflow into ``target`` (which must not exist) and commit it."""
        target.mkdir(parents=True)
        for name, text in self.files().items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_text(text)
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark workflow"]):
            subprocess.run(
                ["git", *args], cwd=target, check=True, env=_git_env(), timeout=GIT_TIMEOUT
            )
        return target


def standard_workflows(quick: bool) -> list[Workflow]:
    """The issue's workloads: chain 20 x 1 s, fanout 40 at 8 at once, tiny 10 x 0.1 s;
    --quick: chain 5, fanout 8 at 4, tiny 5."""
    if quick:
        return [Workflow("chain", 5, 1), Workflow("fanout", 8, 4), Workflow("tiny", 5, 1)]
    return [Workflow("chain", 20, 1), Workflow("fanout", 40, 8), Workflow("tiny", 10, 1)]


def load_workflow(quick: bool) -> Workflow:
    """The load case: 500 short jobs at 32 at once; --quick: 60 at 8."""
    return Workflow("load", 60, 8) if quick else Workflow("load", 500, 32)


def load_outputs(jobs: int, name: str = "load") -> dict[str, str]:
    """What the load (or scale) workflow must leave behind: relative path -> exact text."""
    return {f"{name}/{i}.txt": f"{name} {i}\n" for i in range(1, jobs + 1)}


def rerun_workflow() -> Workflow:
    """The edit-and-rerun loop: three evaluations at --jobs 4, as in tests/test_keep_warm.py."""
    return Workflow("rerun", 3, 4)


def edit_the_evaluation(workdir: Path) -> None:
    """The user's fix between the runs: the evaluations' script changes, so they run again."""
    (workdir / "scripts" / "evaluate.sh").write_text(EVALUATE_EDITED)


def rerun_outputs(jobs: int) -> dict[str, str]:
    """What the rerun must leave behind: every evaluation by the edited script."""
    return {f"eval/{i}.txt": f"score of {i}: 0.75 (fixed)\n" for i in range(1, jobs + 1)}


def pause_workflow() -> Workflow:
    """The idle gap: two GPU jobs, one after the other, the local wait between them."""
    return Workflow("pause", 2, 1)


def pause_outputs() -> dict[str, str]:
    """What the pause workflow must leave behind besides the local job's timestamp."""
    return {"pause/1.txt": "first\n", "pause/2.txt": "first\nsecond\n"}


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"] = "benchmark"
        env[f"GIT_{role}_EMAIL"] = "benchmark@example.org"
    return env
