"""The README's demo: run examples/demo with `snakemake --executor vastai` against the bundled
fake marketplace, then say where the outputs are and what the (fake) bill was.

Run from anywhere: `.venv/bin/python scripts/demo.py [--boot-seconds S] [--jobs N]`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fakevast.harness import FakeVast  # noqa: E402 (the repo root must be on the path)
from tests.workflows import EXAMPLES, git_workflow, snakemake_command, snakemake_env  # noqa: E402


def main() -> int:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--boot-seconds", type=float, default=3.0, help="fake boot delay")
    options.add_argument("--jobs", type=int, default=2)
    options.add_argument("--workdir", type=Path, default=REPO / "demo-run")
    args = options.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    git_workflow(EXAMPLES / "demo", args.workdir)
    with FakeVast(boot_seconds=args.boot_seconds) as fake:
        print(f"Fake Vast.ai marketplace at {fake.url} (boot takes {args.boot_seconds:g} s)")
        command, env = snakemake_command(fake, args.jobs), snakemake_env(fake)
        print("Running:", shell_line(args.workdir, command, env), flush=True)
        done = subprocess.run(command, cwd=args.workdir, env=env)
        ledger = fake.ledger()
    instances = ledger["instances"]
    alive = [i for i in instances if i["ended_at"] is None]
    hours = sum((i["ended_at"] - i["created_at"]) * i["dph_total"] / 3600 for i in instances)
    billed = hours + sum(i["bandwidth_cost"] for i in instances)
    refused = sum(ledger["rate_limited"].values())
    print()
    print(f"Snakemake exited with {done.returncode}.")
    print(f"Outputs: {args.workdir / 'results'}")
    for path in sorted((args.workdir / "results").rglob("*")):
        if path.is_file() and path.name != ".snakemake_timestamp":
            print(f"  {path.relative_to(args.workdir)}")
    print(
        f"The fake marketplace rented {len(instances)} instance(s), billed ${billed:.4f}, "
        f"and has {len(alive)} left running. Calls it refused under Vast.ai's rate limits: "
        f"{refused}."
    )
    return done.returncode or (1 if alive else 0)


def shell_line(workdir: Path, command: list[str], env: dict[str, str]) -> str:
    """The run as one line to paste into a shell: its directory, what its environment changes
    from this one (variables unset, then set), and the command, all shell-quoted."""
    unset = [f"-u {shlex.quote(name)}" for name in sorted(os.environ) if name not in env]
    changed = sorted(name for name, value in env.items() if os.environ.get(name) != value)
    settings = [f"{name}={shlex.quote(env[name])}" for name in changed]
    prefix = ["env", *unset] if unset else []
    return f"cd {shlex.quote(str(workdir))} && " + " ".join(
        [*prefix, *settings, shlex.join(command)]
    )


if __name__ == "__main__":
    sys.exit(main())
