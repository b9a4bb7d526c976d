"""Running real Snakemake against the fake marketplace: workflow copies and the command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.fakevast.harness import FakeVast

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def git_workflow(source: Path, target: Path) -> Path:
    """A copy of an example as its own git repository, as a user's workflow would be."""
    shutil.copytree(source, target)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "workflow"]):
        subprocess.run(["git", *command], cwd=target, check=True, env=env)
    return target


def write_workflow(target: Path, snakefile: str, files: dict[str, str] | None = None) -> Path:
    """A small workflow from text, committed to git (Snakemake ships git-tracked sources)."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "Snakefile").write_text(snakefile)
    for name, text in (files or {}).items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)
    staging = target.with_name(target.name + "-src")
    target.rename(staging)
    return git_workflow(staging, target)


@dataclass
class SnakemakeRun:
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def snakemake_command(fake: FakeVast, jobs: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--executor",
        "vastai",
        "--jobs",
        str(jobs),
        "--vastai-api-url",
        fake.url,
        "--vastai-boot-timeout",
        "120",
        "--seconds-between-status-checks",
        "1",
        "--latency-wait",
        "1",
        *extra,
    ]


def snakemake_env(fake: FakeVast) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAST_", "SNAKEMAKE_"))}
    env["VAST_API_KEY"] = fake.api_key
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_snakemake(
    workdir: Path, fake: FakeVast, *extra: str, jobs: int = 2, timeout: float = 600
) -> SnakemakeRun:
    done = subprocess.run(
        snakemake_command(fake, jobs, *extra),
        cwd=workdir,
        env=snakemake_env(fake),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return SnakemakeRun(done.returncode, done.stdout)


def start_snakemake(workdir: Path, fake: FakeVast, *extra: str, jobs: int = 2) -> subprocess.Popen:
    """For signal tests: a run in the background, its output in workdir/snakemake.out."""
    out = open(workdir / "snakemake.out", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        snakemake_command(fake, jobs, *extra),
        cwd=workdir,
        env=snakemake_env(fake),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_local(workdir: Path, cores: int = 2) -> None:
    """The same workflow with plain local Snakemake: the reference for byte comparisons."""
    subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", str(cores), "--quiet"],
        cwd=workdir,
        check=True,
        capture_output=True,
    )


def result_files(workdir: Path, *folders: str) -> dict[str, bytes]:
    """Every file below the folders, by relative path (Snakemake's markers left out)."""
    found = {}
    for folder in folders:
        for path in sorted((workdir / folder).rglob("*")):
            if path.is_file() and path.name != ".snakemake_timestamp":
                found[str(path.relative_to(workdir))] = path.read_bytes()
    return found
