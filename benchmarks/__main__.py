"""``python -m benchmarks [--quick] [--case all|standard|load|rerun|pause] [--boot-seconds S]
[--rtt-ms MS] [--only chain|fanout|tiny] [--modes ...] [--no-faults] [--no-rate-limits]``

The standard cases: each workflow in its modes against a fresh fake marketplace, written to
``benchmarks/results/<name>.json`` after every case (a crash keeps what was measured). Then
the load case (``benchmarks/load.py``): many short jobs under API errors, with and without
packing, written to ``benchmarks/results/load.json`` (quick: ``quick-load.json``). Then the
edit-and-rerun loop (``benchmarks/rerun.py``), cold and kept warm, written to
``benchmarks/results/rerun.json`` (quick: ``quick-rerun.json``). Then the idle gap
(``benchmarks/pause.py``): a long pause between two GPU jobs, the instance destroyed, kept warm
or stopped, written to ``benchmarks/results/pause.json`` (quick: ``quick-pause.json``). Prints
the tables. Exits 1,
loudly, when a case fails, leaves an instance running or has a call refused under the fake's
rate limits (which are on, as on Vast.ai, unless ``--no-rate-limits``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from benchmarks import load, pause, plot, rerun
from benchmarks.measure import MODES, RATE_LIMITS, BenchmarkError, Case, CaseResult, run_case
from benchmarks.report import document, header, render, write
from benchmarks.workflows import (
    load_workflow,
    pause_workflow,
    rerun_workflow,
    standard_workflows,
)

HERE = Path(__file__).resolve().parent
# 5 s: the issue's fanout figure is for a 5 s boot; the chain's per-warm-job figures do not
# depend on the boot, so one boot serves every standard case (quick and full alike).
BOOT_SECONDS = 5.0
RTT_MS = 50.0  # the pool-rtt mode's simulated SSH round-trip time
CASES = ("all", "standard", "load", "rerun", "pause")
# Which modes each workflow runs in: the RTT dimension is the chain's; tiny is there for the
# remote CPU of a 0.1 s job, which ttl0 (every job cold) would not show.
WORKFLOW_MODES = {
    "chain": ("local", "ttl0", "pool", "pool-rtt"),
    "fanout": ("local", "ttl0", "pool"),
    "tiny": ("local", "pool"),
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="chain 5, fanout 8 at --jobs 4, tiny 5; load 60 jobs at --jobs 8; rerun at a "
        f"{rerun.QUICK_BOOT_SECONDS:g} s boot; pause at a {pause.QUICK_BOOT_SECONDS:g} s boot "
        f"and a {pause.QUICK_GAP_SECONDS:g} s gap",
    )
    parser.add_argument(
        "--case",
        choices=CASES,
        help="standard: chain, fanout and tiny; load: 500 short jobs under API errors "
        "(quick: 60); rerun: the edit-and-rerun loop, cold and kept warm; pause: a long "
        "idle gap between two GPU jobs, the instance destroyed, kept warm or stopped; "
        "default all, or standard when --only or --modes is given",
    )
    parser.add_argument(
        "--boot-seconds",
        type=float,
        help=f"fake boot time (default {BOOT_SECONDS:g}; load case {load.BOOT_SECONDS:g}; "
        f"rerun case {rerun.BOOT_SECONDS:g}, quick {rerun.QUICK_BOOT_SECONDS:g}; pause case "
        f"{pause.BOOT_SECONDS:g}, quick {pause.QUICK_BOOT_SECONDS:g})",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=RTT_MS,
        help=f"SSH round-trip time of the chain's pool-rtt case (default {RTT_MS:g}; 0: no "
        "such case)",
    )
    parser.add_argument("--only", choices=tuple(WORKFLOW_MODES), help="one standard workflow")
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument(
        "--no-faults",
        action="store_true",
        help="load case without its API errors (a diagnostic; results/<name>-nofaults.json)",
    )
    parser.add_argument(
        "--no-rate-limits",
        dest="rate_limits",
        action="store_false",
        default=RATE_LIMITS,
        help="a fake without Vast.ai's rate limits and a plugin that does not pace: for "
        "comparison only (results/<name>-nolimits.json)",
    )
    parser.add_argument(
        "--output", type=Path, help="results file (default: results/<name>.json; one case only)"
    )
    args = parser.parse_args(argv)
    if args.case is None:
        args.case = "standard" if args.only or args.modes else "all"
    if args.case in ("load", "rerun", "pause") and (args.only or args.modes):
        parser.error(f"--only and --modes choose standard cases; the {args.case} case has neither")
    if args.output and args.case == "all":
        parser.error("--output names one results file: add --case standard, load, rerun or pause")
    args.load_boot_seconds = load.BOOT_SECONDS if args.boot_seconds is None else args.boot_seconds
    default = rerun.default_boot_seconds(args.quick)
    args.rerun_boot_seconds = default if args.boot_seconds is None else args.boot_seconds
    default = pause.default_boot_seconds(args.quick)
    args.pause_boot_seconds = default if args.boot_seconds is None else args.boot_seconds
    args.modes = [m.strip() for m in (args.modes or ",".join(MODES)).split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown or not args.modes:
        parser.error(f"--modes takes {', '.join(MODES)}; got {args.modes}")
    if args.rtt_ms < 0:
        parser.error("--rtt-ms must be >= 0")
    # local first: the budgets need it; no pool-rtt case without a round-trip time
    args.modes = [m for m in MODES if m in args.modes and (m != "pool-rtt" or args.rtt_ms)]
    if not args.modes:
        parser.error("no case left to run: pool-rtt needs --rtt-ms above 0")
    if args.boot_seconds is None:
        args.boot_seconds = BOOT_SECONDS
    return args


def result_name(args: argparse.Namespace) -> str:
    """quick / full, with a suffix for a partial run so it never overwrites a whole one."""
    name = "quick" if args.quick else "full"
    if args.only:
        name += f"-{args.only}"
    if args.modes != list(MODES):
        name += "-" + "-".join(args.modes)
    if "pool-rtt" in args.modes and args.rtt_ms != RTT_MS:
        name += f"-rtt{args.rtt_ms:g}"
    return name + limits_suffix(args)


def limits_suffix(args: argparse.Namespace) -> str:
    """A run without the rate limits never overwrites the results README quotes."""
    return "" if args.rate_limits else "-nolimits"


def standard_cases(args: argparse.Namespace) -> list[Case]:
    """Each workflow in its modes (WORKFLOW_MODES) that --modes kept, local first."""
    return [
        Case(
            w,
            mode,
            args.boot_seconds,
            args.rtt_ms if mode == "pool-rtt" else 0.0,
            rate_limits=args.rate_limits,
        )
        for w in standard_workflows(args.quick)
        if args.only in (None, w.name)
        for mode in args.modes
        if mode in WORKFLOW_MODES[w.name]
    ]


def load_result_name(args: argparse.Namespace) -> str:
    """load / quick-load, with -nofaults when run without its faults."""
    name = "quick-load" if args.quick else "load"
    return name + ("-nofaults" if args.no_faults else "") + limits_suffix(args)


def rerun_result_name(args: argparse.Namespace) -> str:
    """rerun / quick-rerun, with the boot when it is not the default (the loop's figures are
    the boots it saves)."""
    name = "quick-rerun" if args.quick else "rerun"
    if args.rerun_boot_seconds != rerun.default_boot_seconds(args.quick):
        name += f"-boot{args.rerun_boot_seconds:g}"
    return name + limits_suffix(args)


def pause_result_name(args: argparse.Namespace) -> str:
    """pause / quick-pause, with the boot when it is not the default (the boot, and the
    restart that follows it, are what the second GPU job waits for)."""
    name = "quick-pause" if args.quick else "pause"
    if args.pause_boot_seconds != pause.default_boot_seconds(args.quick):
        name += f"-boot{args.pause_boot_seconds:g}"
    return name + limits_suffix(args)


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
    if code == 0 and args.case in ("all", "rerun"):
        code = run_rerun(args, argv, stamp)
    if code == 0 and args.case in ("all", "pause"):
        code = run_pause(args, argv, stamp)
    if code == 0 and not args.quick and args.output is None:
        plot.main([])  # the README's figure, from the results files just written
    return code


def run_standard(args: argparse.Namespace, argv: list[str], stamp: str) -> int:
    name = result_name(args)
    output = args.output or HERE / "results" / f"{name}.json"
    scratch = HERE / "scratch" / f"{name}-{stamp}"
    head = header(
        args.boot_seconds, args.quick, ["python", "-m", "benchmarks", *argv], args.rate_limits
    )
    cases = standard_cases(args)
    results: list[CaseResult] = []
    for case in cases:
        print(
            f"== {case.name}: {case.workflow.jobs} jobs, {case.workflow.parallel} at once",
            flush=True,
        )
        try:
            result = run_case(case, scratch / case.name.replace("/", "-"))
        except BenchmarkError as error:
            if error.result is not None:  # it ran to the end: keep its figures
                results.append(error.result)
            doc = document(head, results, args.boot_seconds) | {"error": f"{case.name}: {error}"}
            write(output, doc)
            print(f"\nBENCHMARK FAILED in {case.name}: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; Snakemake and the fake were stopped", file=sys.stderr)
            return 130
        results.append(result)
        refused = "" if result.bill is None else f", {result.bill.refused_calls} refused"
        print(f"   {result.wall_seconds:.1f} s{refused}", flush=True)
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
    head = header(boot, args.quick, ["python", "-m", "benchmarks", *argv], args.rate_limits)
    workflow = load_workflow(args.quick)
    faults = None if args.no_faults else load.FAULTS
    results: list[load.LoadResult] = []
    for variant in load.VARIANTS:
        print(
            f"== load/{variant}: {workflow.jobs} jobs, {workflow.parallel} at once, faults "
            f"{'on' if faults else 'OFF'}, rate limits {'on' if args.rate_limits else 'OFF'}",
            flush=True,
        )
        try:
            result = load.run_variant(
                workflow, variant, scratch / variant, boot, faults, args.rate_limits
            )
        except BenchmarkError as error:
            doc = load.load_document(head, workflow, boot, faults, results, args.rate_limits)
            write(output, doc | {"error": f"load/{variant}: {error}"})
            print(f"\nBENCHMARK FAILED in load/{variant}: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; Snakemake and the fake were stopped", file=sys.stderr)
            return 130
        results.append(result)
        print(f"   {result.wall_seconds:.1f} s, exit {result.exit_status}", flush=True)
        write(output, load.load_document(head, workflow, boot, faults, results, args.rate_limits))
    doc = load.load_document(head, workflow, boot, faults, results, args.rate_limits)
    print("\n" + load.render_load(doc))
    print(f"\nresults: {output}\nscratch: {scratch}")
    failed = [r.variant for r in results if not r.ok]
    if failed:
        print(f"\nBENCHMARK FAILED in load/{', load/'.join(failed)}", file=sys.stderr)
        return 1
    return 0


@dataclass(frozen=True)
class ModeCase:
    """A case measured one mode after another, each in a workdir and fake of its own."""

    name: str
    modes: Iterable[str]
    intro: str  # said before each mode
    run: Callable[[str, Path], Any]  # one mode, in its scratch folder
    document: Callable[[list[Any]], dict[str, Any]]  # the results file, from those so far
    render: Callable[[dict[str, Any]], str]
    outcome: Callable[[Any], str]  # one line on a mode's result


def run_modes(case: ModeCase, output: Path, scratch: Path) -> int:
    """Each mode in turn; the first that fails stops the case, its figures kept (a mode that
    ran to the end keeps its own too)."""
    results: list[Any] = []
    for mode in case.modes:
        print(f"== {case.name}/{mode}: {case.intro}", flush=True)
        try:
            result = case.run(mode, scratch / mode)
        except BenchmarkError as error:
            if error.result is not None:
                results.append(error.result)
            write(output, case.document(results) | {"error": f"{case.name}/{mode}: {error}"})
            print(f"\nBENCHMARK FAILED in {case.name}/{mode}: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; Snakemake and the fake were stopped", file=sys.stderr)
            return 130
        results.append(result)
        print(f"   {case.outcome(result)}", flush=True)
        write(output, case.document(results))
    print("\n" + case.render(case.document(results)))
    print(f"\nresults: {output}\nscratch: {scratch}")
    return 0


def run_rerun(args: argparse.Namespace, argv: list[str], stamp: str) -> int:
    name = rerun_result_name(args)
    boot = args.rerun_boot_seconds
    head = header(boot, args.quick, ["python", "-m", "benchmarks", *argv], args.rate_limits)
    workflow = rerun_workflow()
    case = ModeCase(
        "rerun",
        rerun.MODES,
        f"{workflow.jobs} evaluations, {workflow.parallel} at once, boot {boot:g} s, rate "
        f"limits {'on' if args.rate_limits else 'OFF'}",
        lambda mode, folder: rerun.run_mode(workflow, mode, folder, boot, args.rate_limits),
        lambda results: rerun.rerun_document(head, workflow, boot, results, args.rate_limits),
        rerun.render_rerun,
        lambda r: (
            f"rerun {r.rerun_wall_seconds:.1f} s, {r.rerun_creates} creates, "
            f"{r.rerun_adopted} adopted"
        ),
    )
    output = args.output or HERE / "results" / f"{name}.json"
    return run_modes(case, output, HERE / "scratch" / f"{name}-{stamp}")


def run_pause(args: argparse.Namespace, argv: list[str], stamp: str) -> int:
    name = pause_result_name(args)
    boot = args.pause_boot_seconds
    gap = pause.default_gap_seconds(args.quick)
    head = header(boot, args.quick, ["python", "-m", "benchmarks", *argv], args.rate_limits)
    workflow = pause_workflow()

    def outcome(result: pause.PauseResult) -> str:
        wait = result.second_job_wait_seconds
        waited = "-" if wait is None else f"{wait:.1f}"
        return (
            f"{result.wall_seconds:.1f} s, second GPU job waited {waited} s, ${result.dollars:.4f}"
        )

    case = ModeCase(
        "pause",
        pause.MODES,
        f"gap {gap:g} s, boot {boot:g} s, rate limits {'on' if args.rate_limits else 'OFF'}",
        lambda mode, folder: pause.run_mode(workflow, mode, folder, boot, args.rate_limits, gap),
        lambda results: pause.pause_document(head, workflow, boot, results, args.rate_limits, gap),
        pause.render_pause,
        outcome,
    )
    output = args.output or HERE / "results" / f"{name}.json"
    return run_modes(case, output, HERE / "scratch" / f"{name}-{stamp}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
