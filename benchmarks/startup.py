"""What a bare Snakemake start costs on an instance: ``python -m benchmarks.startup``.

Why: a warm job's ``remote`` phase is well over its ``sleep 1``, and whether that is the
interpreter, Snakemake's imports, the job itself or our exit detection decides what a fix
must attack. This rents one instance from a fresh fake (the same image and runtime the
benchmark's jobs use), then times each step inside it with bash's ``time`` (real and CPU
seconds, no SSH round trip included), several times, and reports the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import paramiko

from benchmarks.measure import RATE_LIMITS
from benchmarks.workflows import Workflow
from tests.fakevast.clients import public_key, rent, run, sdk, ssh_login, wait_status
from tests.fakevast.harness import FakeVast

HERE = Path(__file__).resolve().parent
WORKDIR = "/root/startup"
# The flags that shape a remote job's start, as the plugin's generated command has them.
JOB = (
    "python -m snakemake --snakefile Snakefile --target-jobs step:i=1 --allowed-rules step "
    "--cores all --attempt 1 --force-use-threads --force --target-files-omit-workdir-adjustment "
    "--max-inventory-time 0 --retries 0 --nocolor --no-hooks --nolock --ignore-incomplete "
    "--shared-fs-usage none --latency-wait 5 --scheduler ilp --mode remote"
)
STEPS = {
    "interpreter (python -c pass)": "python -c pass",
    "import snakemake.cli": "python -c 'import snakemake.cli'",
    "snakemake --version": "python -m snakemake --version",
    "one chain job (sleep 1)": JOB,
}


@dataclass(frozen=True)
class StepTiming:
    step: str
    real_median: float
    cpu_median: float  # user + system
    runs: int


def time_step(client: paramiko.SSHClient, command: str, runs: int) -> tuple[float, float]:
    """Median real and CPU seconds of ``command`` in the instance's workdir."""
    reals, cpus = [], []
    for _ in range(runs):
        # The redirection goes inside the timed subshell: outside, it would take the report too.
        timed = f"{{ time ( {command} >/dev/null 2>&1 ) ; }} 2>&1"
        script = f"cd {WORKDIR}\nTIMEFORMAT='%R %U %S'\n{timed}"
        out = run(client, f"bash -c {shlex.quote(script)}", timeout=120)
        real, user, system = (float(x) for x in out.split()[-3:])
        reals.append(real)
        cpus.append(user + system)
    return round(statistics.median(reals), 3), round(statistics.median(cpus), 3)


def measure(runs: int) -> list[StepTiming]:
    key = paramiko.ECDSAKey.generate()
    with FakeVast(rate_limits=RATE_LIMITS, boot_seconds=0) as fake:
        vast = sdk(fake)
        instance = rent(vast, query="num_gpus>=1", runtype="ssh_proxy")
        try:
            vast.attach_ssh(instance, public_key(key))
            row = wait_status(vast, instance, "running", timeout=60)
            client = ssh_login(row["ssh_host"], row["ssh_port"], key)
            try:
                run(client, f"mkdir -p {WORKDIR}")
                with client.open_sftp() as sftp:
                    for name, text in Workflow("chain", 1, 1).files().items():
                        with sftp.open(f"{WORKDIR}/{name}", "w") as handle:
                            handle.write(text)
                return [
                    StepTiming(step, *time_step(client, command, runs), runs)
                    for step, command in STEPS.items()
                ]
            finally:
                client.close()
        finally:
            vast.destroy_instance(instance)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "startup.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    timings = measure(args.runs)
    doc = {
        "machine_nproc": os.cpu_count(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "steps": [asdict(t) for t in timings],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    for t in timings:
        print(f"{t.step:<32} real {t.real_median:6.3f} s   cpu {t.cpu_median:6.3f} s")
    print(f"load average (1 min) before/after: {doc['load_average_1min']}; {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
