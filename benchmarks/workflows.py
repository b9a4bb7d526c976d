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
SLEEP_SECONDS = 1

_CHAIN = """\
# chain: {jobs} dependent jobs; each sleeps {sleep} s, then copies its input to its output.
localrules: all


rule all:
    input:
        "chain/{jobs}.txt",


def previous(wildcards):
    i = int(wildcards.i)
    return "seed.txt" if i == 1 else f"chain/{{i - 1}}.txt"


rule step:
    input:
        previous,
    output:
        "chain/{{i}}.txt",
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

_TEMPLATES = {"chain": _CHAIN, "fanout": _FANOUT}


@dataclass(frozen=True)
class Workflow:
    """One benchmark workflow: which shape, how many remote jobs, how many at once."""

    name: str  # "chain" or "fanout"
    jobs: int  # jobs that run remotely; the target rule `all` is local and not counted
    parallel: int  # --jobs for the executor, --cores for plain local Snakemake

    def snakefile(self) -> str:
        return _TEMPLATES[self.name].format(jobs=self.jobs, sleep=SLEEP_SECONDS)

    def files(self) -> dict[str, str]:
        files = {"Snakefile": self.snakefile()}
        if self.name == "chain":
            files["seed.txt"] = "seed\n"
        return files

    def create(self, target: Path) -> Path:
        """Write the workflow into ``target`` (which must not exist) and commit it."""
        target.mkdir(parents=True)
        for name, text in self.files().items():
            (target / name).write_text(text)
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark workflow"]):
            subprocess.run(
                ["git", *args], cwd=target, check=True, env=_git_env(), timeout=GIT_TIMEOUT
            )
        return target


def standard_workflows(quick: bool) -> list[Workflow]:
    """The issue's workloads: chain 20 / fanout 40 at 8 at once; --quick: 5 / 8 at 4."""
    if quick:
        return [Workflow("chain", 5, 1), Workflow("fanout", 8, 4)]
    return [Workflow("chain", 20, 1), Workflow("fanout", 40, 8)]


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"] = "benchmark"
        env[f"GIT_{role}_EMAIL"] = "benchmark@example.org"
    return env
