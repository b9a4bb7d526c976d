"""``python -m benchmarks [--quick] [--boot-seconds S] [--only chain|fanout] [--modes ...]``

Runs each workflow in each mode against a fresh fake marketplace, writes
``benchmarks/results/<name>.json`` after every case (a crash keeps what was measured) and
prints the table. Exits 1, loudly, when a case fails or leaves an instance running.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from benchmarks.measure import MODES, BenchmarkError, Case, CaseResult, run_case
from benchmarks.report import document, header, render, write
from benchmarks.workflows import standard_workflows

HERE = Path(__file__).resolve().parent
FULL_BOOT_SECONDS = 20.0
QUICK_BOOT_SECONDS = 5.0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="chain 5, fanout 8 at --jobs 4, 5 s boot"
    )
    parser.add_argument("--boot-seconds", type=float, help="fake boot time (default 20, quick 5)")
    parser.add_argument("--only", choices=("chain", "fanout"), help="one workflow only")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}"
    )
    parser.add_argument("--output", type=Path, help="results file (default: results/<name>.json)")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown or not args.modes:
        parser.error(f"--modes takes {', '.join(MODES)}; got {args.modes}")
    args.modes = [m for m in MODES if m in args.modes]  # local first: chain's budget needs it
    if args.boot_seconds is None:
        args.boot_seconds = QUICK_BOOT_SECONDS if args.quick else FULL_BOOT_SECONDS
    return args


def result_name(args: argparse.Namespace) -> str:
    """quick / full, with a suffix for a partial run so it never overwrites a whole one."""
    name = "quick" if args.quick else "full"
    if args.only:
        name += f"-{args.only}"
    if args.modes != list(MODES):
        name += "-" + "-".join(args.modes)
    return name


def _terminate(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt  # the same clean-up path as Ctrl-C: Snakemake, then the fake


def main(argv: list[str]) -> int:
    args = parse(argv)
    # Ctrl-C must work even when started in the background (a shell then ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    name = result_name(args)
    output = args.output or HERE / "results" / f"{name}.json"
    scratch = HERE / "scratch" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    head = header(args.boot_seconds, args.quick, ["python", "-m", "benchmarks", *argv])
    workflows = [w for w in standard_workflows(args.quick) if args.only in (None, w.name)]
    cases = [Case(w, mode, args.boot_seconds) for w in workflows for mode in args.modes]
    results: list[CaseResult] = []
    for case in cases:
        print(
            f"== {case.name}: {case.workflow.jobs} jobs, {case.workflow.parallel} at once",
            flush=True,
        )
        try:
            result = run_case(case, scratch / case.name.replace("/", "-"))
        except BenchmarkError as error:
            doc = document(head, results, args.boot_seconds) | {"error": f"{case.name}: {error}"}
            write(output, doc)
            print(f"\nBENCHMARK FAILED in {case.name}: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; Snakemake and the fake were stopped", file=sys.stderr)
            return 130
        results.append(result)
        print(f"   {result.wall_seconds:.1f} s", flush=True)
        write(output, document(head, results, args.boot_seconds))
    doc = document(head, results, args.boot_seconds)
    print("\n" + render(doc))
    print(f"\nresults: {output}\nscratch: {scratch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
