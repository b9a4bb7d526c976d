"""Checks made once, when the DAG is known and before anything is rented: what cannot work
remotely is refused, and what may surprise the user is said while it is still free to fix.

Why before the first rent: an output outside the workflow directory, or a script that is not
shipped, used to show up only after an instance had booted and billed. The same goes for the
safe defaults (datacenters only, reliability 0.98): the cheaper offers they leave out are
named where a price is first seen (``offers``, the first rent), not when a price cap fails.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from snakemake_executor_plugin_vastai.base.errors import UserError
from snakemake_executor_plugin_vastai.base.report import count

SHOWN_FILES = 8
"""How many shipped files the not-a-git-repository warning lists by name."""
SHOWN_UNSHIPPED = 10
"""How many untracked files the not-shipped warning lists by name."""
OWN_STATE = ".snakemake"
"""Snakemake's and the plugin's state in the workflow directory: never a source."""
LOWEST_SNAKEMAKE = (9, 14)
"""The lowest Snakemake the plugin runs on, with the interface packages a fresh install gets
(CI runs the Snakemake-facing tests on it: scripts/test_lowest_snakemake.sh; the floor of
``snakemake`` in pyproject.toml's test extra says the same)."""


class UnsupportedSnakemake(UserError):
    """The installed Snakemake is outside the range the plugin is tested on."""


def require_supported_snakemake(installed: str) -> None:
    """Refuse a Snakemake outside 9.14 .. 9.x at start: older releases fail deep inside a
    job (an argument their source files do not take, an internal they lack), a new major
    release may change the executor interface."""
    parts = [int(part) for part in re.findall(r"\d+", installed)[:2]]
    lowest = ".".join(map(str, LOWEST_SNAKEMAKE))
    if len(parts) == 2 and tuple(parts) >= LOWEST_SNAKEMAKE and parts[0] == LOWEST_SNAKEMAKE[0]:
        return
    raise UnsupportedSnakemake(
        f"The vastai executor needs Snakemake {lowest} or newer within "
        f"{LOWEST_SNAKEMAKE[0]}.x; this is Snakemake {installed}. "
        f"Install a supported one: pip install 'snakemake>={lowest},<{LOWEST_SNAKEMAKE[0] + 1}'."
    )


class OutsideWorkdirError(UserError):
    """A remote job would write a file outside the workflow directory, which is all that a
    job's results may touch here (a host must never write elsewhere on this machine)."""


@dataclass(frozen=True)
class PlannedJob:
    """What the checks need to know of one remote job, read from Snakemake's job once."""

    rule: str
    """The rule name, or "group <id> (rules a, b)"."""
    written: tuple[str, ...]
    """Outputs, logs and benchmark files that come back over SSH (storage files excluded)."""
    asks_gpu: bool


def refuse_outside_outputs(jobs: Iterable[PlannedJob], workdir: Path) -> None:
    """Raise if any job writes outside ``workdir``, naming every such rule and file."""
    root = workdir.resolve()
    offending: dict[str, list[str]] = {}
    for job in jobs:
        for path in job.written:
            if not _inside(root, path) and path not in offending.setdefault(job.rule, []):
                offending[job.rule].append(path)
    named = [f"rule {rule}: {', '.join(paths)}" for rule, paths in offending.items() if paths]
    if named:
        raise OutsideWorkdirError(
            f"Outputs outside the workflow directory {root} cannot come back from a Vast.ai "
            f"instance ({'; '.join(named)}). Write them inside the workflow directory, use "
            "a storage provider for them, or run those rules here with `localrules:`."
        )


def cpu_only_notice(jobs: Iterable[PlannedJob]) -> str | None:
    """The rules that will rent GPU machines without asking for a GPU, and the way to keep
    them local; None when every remote rule asks for one."""
    rules = sorted({job.rule for job in jobs if not job.asks_gpu})
    if not rules:
        return None
    names = ", ".join(rules)
    return (
        f"Rules without a gpu resource run on rented GPU machines too (Vast.ai rents nothing "
        f"else): {names}. To run them on this machine instead, add `localrules: {names}` to "
        "the Snakefile."
    )


def not_git_warning(workdir: Path, shipped: list[str]) -> str | None:
    """A warning naming what will be shipped when the workflow is not a git repository
    (Snakemake then knows no sources beyond the essential ones); None inside one."""
    if is_git_work_tree(workdir):
        return None
    shown = ", ".join(shipped[:SHOWN_FILES])
    more = f" and {len(shipped) - SHOWN_FILES} more" if len(shipped) > SHOWN_FILES else ""
    return (
        f"{workdir.resolve()} is not a git repository, so only the workflow's own sources go "
        f"to the instances ({count(len(shipped), 'file')}: {shown}{more}). Files a job reads "
        "that are neither inputs nor among these (modules, helper scripts) will be missing "
        "remotely: "
        "make the directory a git repository and `git add` them, or name them with "
        "--vastai-deploy-paths."
    )


def unshipped_warning(workdir: Path, shipped: Iterable[str], declared: Iterable[str]) -> str | None:
    """A warning naming the files git neither tracks nor ignores that no instance gets
    (neither a shipped source nor a job's declared file), with the fix; None without any.
    Why: a job that reads one fails only after renting, on a file that exists here."""
    missing = unshipped_files(untracked_files(workdir), shipped, declared)
    if not missing:
        return None
    shown = ", ".join(missing[:SHOWN_UNSHIPPED])
    more = len(missing) - SHOWN_UNSHIPPED
    return (
        f"Not tracked by git, so not shipped to the instances ({count(len(missing), 'file')}): "
        f"{shown}{f' and {more} more' if more > 0 else ''}. A remote job that reads one "
        "without declaring it as an input will not find it: `git add` it or name it in "
        "`--vastai-deploy-paths`."
    )


def untracked_files(workdir: Path) -> list[str]:
    """Files below ``workdir`` that git neither tracks nor ignores, relative to it; none
    outside a git work tree or without git."""
    try:
        found = subprocess.run(
            ["git", "-C", str(workdir), "ls-files", "--others", "--exclude-standard", "-z"],
            capture_output=True,
            check=False,
        )
    except OSError:
        return []
    if found.returncode != 0:
        return []
    return [os.fsdecode(name) for name in found.stdout.split(b"\0") if name]


def unshipped_files(
    untracked: Iterable[str], shipped: Iterable[str], declared: Iterable[str]
) -> list[str]:
    """The ``untracked`` files that are not shipped: neither a source in the bundle nor a
    job's declared file or below a declared directory (inputs travel on their own; outputs
    and logs are made remotely), nor Snakemake's or the plugin's own state."""
    sources = {os.path.normpath(path) for path in shipped}
    known = {os.path.normpath(os.path.relpath(p) if os.path.isabs(p) else p) for p in declared}
    left = []
    for path in map(os.path.normpath, untracked):
        parts = path.split(os.sep)
        tops = {os.sep.join(parts[:depth]) for depth in range(1, len(parts) + 1)}
        if path not in sources and parts[0] != OWN_STATE and not tops & known:
            left.append(path)
    return sorted(left)


def is_git_work_tree(workdir: Path) -> bool:
    """True inside a git work tree; False without one or without git itself."""
    try:
        found = subprocess.run(
            ["git", "-C", str(workdir), "rev-parse", "--is-inside-work-tree"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return False
    return found.returncode == 0 and found.stdout.strip() == "true"


def _inside(root: Path, path: str) -> bool:
    absolute = Path(os.path.normpath(root / path))  # relative paths are relative to root
    return absolute == root or root in absolute.parents
