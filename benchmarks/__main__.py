"""``python -m benchmarks [--quick] [--case all|standard|load] [--boot-seconds S]
[--only chain|fanout] [--modes ...] [--no-faults]``

The standard cases: each workflow in each mode against a fresh fake marketplace, written to
``benchmarks/results/<name>.json`` after every case (a crash keeps what was measured). Then
the load case (``benchmarks/load.py``): many short jobs under API errors, with and without
packing, written to ``benchmarks/results/load.json`` (quick: ``quick-load.json``). Prints the
tables. Exits 1, loudly, when a case fails or leaves an instance running.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from benchmarks import load
from benchmarks.measure import MODES, BenchmarkError, Case, CaseResult, run_case
from benchmarks.report import document, header, render, write
from benchmarks.workflows import load_workflow, standard_workflows

HERE = Path(__file__).resolve().parent
FULL_BOOT_SECONDS = 20.0
QUICK_BOOT_SECONDS = 5.0
CASES = ("all", "standard", "load")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="chain 5, fanout 8 at --jobs 4, 5 s boot; load 60 jobs at --jobs 8",
    )
    parser.add_argument(
        "--case",
        choices=CASES,
        help="standard: chain and fanout; load: 500 short jobs under API errors (quick: 60); "
        "default all, or standard when --only or --modes is given",
    )
    parser.add_argument(
        "--boot-seconds",
        type=float,
        help=f"fake boot time (default 20, quick 5; load case {load.BOOT_SECONDS:g})",
    )
    parser.add_argument("--only", choices=("chain", "fanout"), help="one standard workflow only")
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument(
        "--no-faults",
        action="store_true",
        help="load case without its API errors (a diagnostic; results/<name>-nofaults.json)",
    )
    parser.add_argument(
        "--output", type=Path, help="results file (default: results/<name>.json; one case only)"
    )
    args = parser.parse_args(argv)
    if args.case is None:
        args.case = "standard" if args.only or args.modes else "all"
    if args.case == "load" and (args.only or args.modes):
        parser.error("--only and --modes choose standard cases; the load case has neither")
    if args.output and args.case == "all":
        parser.error("--output names one results file: add --case standard or --case load")
    args.load_boot_seconds = load.BOOT_SECONDS if args.boot_seconds is None else args.boot_seconds
    args.modes = [m.strip() for m in (args.modes or ",".join(MODES)).split(",") if m.strip()]
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


def load_result_name(args: argparse.Namespace) -> str:
    """load / quick-load, with -nofaults when run without its faults."""
    name = "quick-load" if args.quick else "load"
    return name + ("-nofaults" if args.no_faults else "")


def _terminate(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt  # the same clean-up path as Ctrl-C: Snakemake, then the fake


def main(argv: list[str]) -> int:
    args = parse(argv)
    # Ctrl-C must work even when started in the background (a shell then ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    code = 0
    if args.case in ("all", "standard"):
        code = run_standard(args, argv, stamp)
    if code == 0 and args.case in ("all", "load"):
        code = run_load(args, argv, stamp)
    return code


def run_standard(args: argparse.Namespace, argv: list[str], stamp: str) -> int:
    name = result_name(args)
    output = args.output or HERE / "results" / f"{name}.json"
    scratch = HERE / "scratch" / f"{name}-{stamp}"
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


def run_load(args: argparse.Namespace, argv: list[str], stamp: str) -> int:
    """Both variants, even when the first fails: its exit status is one of the figures."""
    name = load_result_name(args)
    output = args.output or HERE / "results" / f"{name}.json"
    scratch = HERE / "scratch" / f"{name}-{stamp}"
    boot = args.load_boot_seconds
    head = header(boot, args.quick, ["python", "-m", "benchmarks", *argv])
    workflow = load_workflow(args.quick)
    faults = None if args.no_faults else load.FAULTS
    results: list[load.LoadResult] = []
    for variant in load.VARIANTS:
        print(
            f"== load/{variant}: {workflow.jobs} jobs, {workflow.parallel} at once, faults "
            f"{'on' if faults else 'OFF'}",
            flush=True,
        )
        try:
            result = load.run_variant(workflow, variant, scratch / variant, boot, faults)
        except BenchmarkError as error:
            doc = load.load_document(head, workflow, boot, faults, results)
            write(output, doc | {"error": f"load/{variant}: {error}"})
            print(f"\nBENCHMARK FAILED in load/{variant}: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; Snakemake and the fake were stopped", file=sys.stderr)
            return 130
        results.append(result)
        print(f"   {result.wall_seconds:.1f} s, exit {result.exit_status}", flush=True)
        write(output, load.load_document(head, workflow, boot, faults, results))
    print("\n" + load.render_load(load.load_document(head, workflow, boot, faults, results)))
    print(f"\nresults: {output}\nscratch: {scratch}")
    failed = [r.variant for r in results if not r.ok]
    if failed:
        print(f"\nBENCHMARK FAILED in load/{', load/'.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
