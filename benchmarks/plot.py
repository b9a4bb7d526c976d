"""``python -m benchmarks.plot [--standard F] [--load F] [--rerun F] [--output PNG]``: the
README's figure.

Wall time and dollars per workflow and mode, and the edit-and-rerun loop (the rerun's wall
time and its wait for the first remote job, cold and kept warm), drawn from the results files
the benchmark wrote, so the picture can never disagree with the tables beside it. ``python -m
benchmarks`` redraws it after every complete run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here or in CI: render to a file only

from matplotlib import pyplot  # after use(): the backend must be chosen first

RESULTS = Path(__file__).resolve().parent / "results"
MODE_LABELS = {
    "local": "local Snakemake",
    "ttl0": "one instance per job",
    "pool": "warm pool",
    "pack": "pool + packing",
    "no-pack": "pool, --vastai-no-pack",
    "cold": "rerun, nothing kept",
    "kept": "rerun, --vastai-keep-warm",
}
LOOP_GROUPS = ("rerun wall", "to first remote job")


@dataclass(frozen=True)
class Bar:
    """One measured case: its group on the x axis, its mode, and the two figures."""

    group: str
    mode: str
    wall_seconds: float
    dollars: float | None


def bars(standard: dict[str, Any] | None, load: dict[str, Any] | None) -> list[Bar]:
    """The cases of both results files as bars; local runs cost nothing on Vast.ai."""
    found = []
    for case in (standard or {}).get("cases", []):
        title = f"{case['workflow']} of {case['jobs']}"
        dollars = None if case["mode"] == "local" else case.get("dollars")
        found.append(Bar(title, case["mode"], case["wall_seconds"], dollars))
    if load:
        title = f"load: {load['load']['jobs']} jobs" if "load" in load else "load"
        for variant in load.get("variants", []):
            found.append(
                Bar(title, variant["variant"], variant["wall_seconds"], variant["dollars"])
            )
    return found


@dataclass(frozen=True)
class LoopBar:
    """One mode of the edit-and-rerun loop: the rerun's two times, the whole loop's dollars."""

    mode: str
    wall_seconds: float
    first_job_seconds: float | None
    dollars: float
    boot_seconds: float


def loop_bars(rerun: dict[str, Any] | None) -> list[LoopBar]:
    if not rerun:
        return []
    boot = rerun["rerun"]["boot_seconds"]
    return [
        LoopBar(
            m["mode"], m["rerun_wall_seconds"], m["rerun_first_job_seconds"], m["dollars"], boot
        )
        for m in rerun.get("modes", [])
    ]


def place(spot: int, index: int, count: int) -> tuple[float, float]:
    """x and width of bar ``index`` of ``count`` in the cluster at ``spot``."""
    width = 0.8 / count
    return spot + (index - (count - 1) / 2) * width, width


def draw(found: list[Bar], output: Path, limits: str = "", loop: Sequence[LoopBar] = ()) -> Path:
    """Two panels (wall seconds, dollars on a log scale: a per-job instance costs tens of
    times the pool), one cluster of bars per workflow, one colour per mode; a third for the
    edit-and-rerun loop when it was measured."""
    groups = list(dict.fromkeys(bar.group for bar in found))
    modes = list(dict.fromkeys([*(bar.mode for bar in found), *(bar.mode for bar in loop)]))
    colours = dict(zip(modes, pyplot.get_cmap("tab10").colors, strict=False))
    panels = 3 if loop else 2
    figure, panes = pyplot.subplots(1, panels, figsize=(6 * panels, 4.5))
    wall, cost = panes[0], panes[1]
    labelled: set[str] = set()
    for spot, group in enumerate(groups):
        cluster = [bar for bar in found if bar.group == group]
        for index, bar in enumerate(cluster):
            x, width = place(spot, index, len(cluster))
            label = None if bar.mode in labelled else mode_label(bar.mode)
            labelled.add(bar.mode)
            wall.bar(x, bar.wall_seconds, width, color=colours[bar.mode], label=label)
            if bar.dollars:
                cost.bar(x, bar.dollars, width, color=colours[bar.mode])
    cost.set_yscale("log")
    for axes, title in ((wall, "wall time (s)"), (cost, "Vast.ai bill ($, fake prices, log)")):
        axes.set_xticks(range(len(groups)), groups)
        axes.set_title(title)
        axes.grid(axis="y", alpha=0.3)
    wall.legend(fontsize="small")
    if loop:
        draw_loop(panes[2], loop, colours)
    figure.suptitle(
        "snakemake-executor-plugin-vastai: the same workflows, by mode (2-core VM"
        + (f"; {limits})" if limits else ")")
    )
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    pyplot.close(figure)
    return output


def draw_loop(axes: Any, loop: Sequence[LoopBar], colours: dict[str, Any]) -> None:
    """The rerun's wall time and its wait for the first remote job, one bar per mode; the
    legend gives each loop's dollars (both runs and the idle time between them)."""
    for index, bar in enumerate(loop):
        heights = (bar.wall_seconds, bar.first_job_seconds or 0.0)
        for spot, height in enumerate(heights):
            x, width = place(spot, index, len(loop))
            label = f"{mode_label(bar.mode)}: loop ${bar.dollars:.4f}" if spot == 0 else None
            axes.bar(x, height, width, color=colours[bar.mode], label=label)
    axes.set_xticks(range(len(LOOP_GROUPS)), LOOP_GROUPS)
    axes.set_title(f"edit and rerun, {loop[0].boot_seconds:g} s boot (s)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small")


def mode_label(mode: str) -> str:
    if mode.startswith("pool-rtt"):
        return f"warm pool, {mode.removeprefix('pool-rtt')} ms RTT"
    return MODE_LABELS.get(mode, mode)


def read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def limits_note(*docs: dict[str, Any] | None) -> str:
    """Whether the results were measured under Vast.ai's rate limits, for the title: the
    figures mean something else without them."""
    seen = {(doc.get("header") or {}).get("rate_limits") for doc in docs if doc}
    if seen == {True}:
        return "Vast.ai's rate limits on"
    if seen == {False}:
        return "no rate limits"
    return "rate limits: mixed or unknown" if seen else ""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__)
    parser.add_argument("--standard", type=Path, default=RESULTS / "full.json")
    parser.add_argument("--load", type=Path, default=RESULTS / "load.json")
    parser.add_argument("--rerun", type=Path, default=RESULTS / "rerun.json")
    parser.add_argument("--output", type=Path, default=RESULTS / "overview.png")
    args = parser.parse_args(argv)
    standard, load, rerun = read(args.standard), read(args.load), read(args.rerun)
    found = bars(standard, load)
    if not found:
        print(f"no results in {args.standard} or {args.load}", file=sys.stderr)
        return 1
    note = limits_note(standard, load, rerun)
    print(f"plot: {draw(found, args.output, note, loop_bars(rerun))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
