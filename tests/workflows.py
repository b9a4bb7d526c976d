"""Running real Snakemake against the fake marketplace: workflow copies and the command line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snakemake_executor_plugin_vastai.market.marketplace import UNPACED_ENV
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
    seconds: float = 0.0  # wall time of the whole snakemake process

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
    if not getattr(
        fake, "rate_limits", False
    ):  # a test about something else: the plugin need not pace either
        env[UNPACED_ENV] = "1"
    return env


def with_overrides(env: dict[str, str], overrides: Mapping[str, str | None]) -> dict[str, str]:
    """``env`` with variables replaced; a None value removes the variable."""
    changed = dict(env)
    for name, value in overrides.items():
        if value is None:
            changed.pop(name, None)
        else:
            changed[name] = value
    return changed


def run_snakemake(
    workdir: Path,
    fake: FakeVast,
    *extra: str,
    jobs: int = 2,
    timeout: float = 600,
    env: Mapping[str, str | None] | None = None,
) -> SnakemakeRun:
    """``env`` overrides snakemake_env's variables (None removes one)."""
    started = time.monotonic()
    done = subprocess.run(
        snakemake_command(fake, jobs, *extra),
        cwd=workdir,
        env=with_overrides(snakemake_env(fake), env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return SnakemakeRun(done.returncode, done.stdout, time.monotonic() - started)


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


@contextmanager
def running_snakemake(
    workdir: Path, fake: FakeVast, *extra: str, jobs: int = 2
) -> Iterator[subprocess.Popen]:
    """start_snakemake that never outlives the test: killed (by its pid) if still running."""
    process = start_snakemake(workdir, fake, *extra, jobs=jobs)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


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


ONE_RULE_SNAKEFILE = """\
rule all:
    input: "out.txt"


rule make:
    output: "out.txt"
    resources: {resources}
    shell: {shell!r}
"""
JOB_LOGS = Path(".snakemake/auxiliary/vastai-logs")
JOB_STARTED = "JOB-STARTED"
# Shell that prints JOB_STARTED; the quotes keep the marker itself out of the command's text,
# which a log may echo before the command runs.
ANNOUNCE_START = "echo JOB-''STARTED"


FLAT_OFFERS = Path(__file__).parent / "data" / "offers-1gpu-flat.json"


def proxy_down_fake(start: Callable[..., FakeVast], tmp_path: Path) -> FakeVast:
    """A fake (started by ``start``, a fakevast_factory) whose next instance reports running
    but whose SSH proxy tunnel never comes up, on offers without a direct port: the run
    cannot log in until it reboots the instance."""
    offers = json.loads(FLAT_OFFERS.read_text())
    no_direct_port = tmp_path / "offers.json"
    no_direct_port.write_text(json.dumps([o | {"direct_port_count": 0} for o in offers]))
    fake = start(boot_seconds=0, offers=no_direct_port)
    fake.set_faults({"next_creates": {"count": 1, "proxy_down": True}})
    return fake


def one_rule_workflow(target: Path, shell: str, resources: str = "gpu=1") -> Path:
    """A workflow whose only remote job is rule ``make``, which must create out.txt."""
    return write_workflow(target, ONE_RULE_SNAKEFILE.format(resources=resources, shell=shell))


def job_errors(output: str) -> list[str]:
    """The ``message:`` of every failed job, as the executor reported it to Snakemake."""
    return re.findall(
        r"^\s+message: (.*?)For further error details see", output, re.MULTILINE | re.DOTALL
    )


def fatal_error(output: str) -> str:
    """The message of the exception that stopped Snakemake as a whole (``XError:`` then text,
    or ``Error: text``, as Snakemake prints a user's mistake)."""
    found = re.findall(
        r"^(?:\w+(?:Error|Exception):\n|Error: )(.*?)(?=^  File |\Z)", output, re.M | re.S
    )
    return found[-1].strip() if found else ""


def rented(fake: FakeVast) -> list[dict[str, Any]]:
    """Every instance the fake ever created, in creation order."""
    return fake.ledger()["instances"]


def assert_nothing_rented(fake: FakeVast) -> None:
    ledger = fake.ledger()
    assert ledger["instances"] == [], ledger["instances"]
    assert "PUT /api/v0/asks/{id}/" not in ledger["api_calls"], ledger["api_calls"]


def assert_all_destroyed(fake: FakeVast, workdir: Path) -> list[dict[str, Any]]:
    """Nothing billing in the fake, and the run's own crash-safety ledger agrees. Returns
    every instance the fake ever created."""
    from snakemake_executor_plugin_vastai.pool.ledger import Ledger

    instances = rented(fake)
    assert instances, "the run rented nothing"
    assert [i["status"] for i in instances] == ["destroyed"] * len(instances), instances
    still_open = Ledger(workdir / ".snakemake" / "vastai").open_records()
    assert still_open == [], f"the plugin's ledger still has open rents: {still_open}"
    return instances


def job_started(workdir: Path, marker: str) -> bool:
    """True once a job's streamed log shows ``marker``: its command is really running."""
    logs = workdir / JOB_LOGS
    return logs.is_dir() and any(marker in p.read_text(errors="replace") for p in logs.iterdir())


def wait_until_running(
    fake: FakeVast,
    workdir: Path,
    process: subprocess.Popen,
    marker: str = JOB_STARTED,
    timeout: float = 90,
) -> int:
    """Wait until the job printed ``marker`` on its instance; returns that instance's id."""

    def ready() -> bool:
        if process.poll() is not None:
            output = (workdir / "snakemake.out").read_text()
            raise AssertionError(f"snakemake ended before the job started:\n{output}")
        return job_started(workdir, marker)

    fake.wait_for(ready, timeout, interval=0.2)
    alive = [i for i in fake.alive_instances() if i["status"] == "running"]
    assert len(alive) == 1, alive
    return alive[0]["id"]


INSTANCE_TOKEN = (
    'f="$HOME/.instance-token"; t="$f.$$"; [ -s "$f" ] || cat /proc/sys/kernel/random/uuid > '
    '"$t"; [ -s "$f" ] || ln "$t" "$f" 2>/dev/null || true; rm -f "$t"; cat "$f"'
)
"""Shell that prints an id of the instance it runs on (made once, kept in the instance's home):
a job that writes it into its output lets a test tell, from the instance's side, which jobs
shared an instance. Made with a hard link, which fails when the file exists: two jobs that
start at once on a new instance agree on one id; the one that loses goes on (`|| true`: jobs
run under `set -e`). No braces: Snakemake formats shell commands."""


def run_summary(workdir: Path) -> dict[str, Any]:
    """The cost summary JSON the plugin wrote at the end of the (only) run in ``workdir``."""
    import json

    found = sorted((workdir / ".snakemake" / "vastai").glob("summary-*.json"))
    assert len(found) == 1, f"expected one cost summary, found {found}"
    return json.loads(found[0].read_text())


def helper(workdir: Path, fake: FakeVast, *args: str) -> str:
    """The snakemake-vastai command, as a user runs it in the workflow directory."""
    done = subprocess.run(
        [sys.executable, "-m", "snakemake_executor_plugin_vastai.cli.commands", *args],
        cwd=workdir,
        env={"VAST_API_KEY": fake.api_key, "VAST_URL": fake.url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def reap(workdir: Path, fake: FakeVast) -> str:
    """``snakemake-vastai reap`` in the workflow directory; its output."""
    return helper(workdir, fake, "reap")
