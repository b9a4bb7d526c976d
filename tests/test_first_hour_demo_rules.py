"""The demo's Snakefile is the first workflow a new user reads: its opening comment names only
rules the workflow has (issue 20, item 12: it named a `report` rule that does not exist)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from itertools import takewhile
from pathlib import Path

from tests.workflows import EXAMPLES


def rules_of(workflow: Path) -> set[str]:
    """The rules as Snakemake itself lists them."""
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "--list-rules"],
        cwd=workflow,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return set(done.stdout.split())


def named_in_opening_comment(snakefile: Path) -> set[str]:
    """Rule names the opening comment uses: `quoted` ones, and the steps of its
    "a -> b -> c and d" pipeline."""
    lines = takewhile(lambda line: line.startswith("#"), snakefile.read_text().splitlines())
    comment = " ".join(line.lstrip("# ") for line in lines)
    pipeline = re.search(r'"([^"]*->[^"]*)"', comment)
    assert pipeline, comment
    steps = re.split(r"\s*->\s*|\s+and\s+", pipeline.group(1))
    return {*steps, *re.findall(r"`(\w+)`", comment)}


def test_the_demo_snakefile_names_only_its_own_rules(tmp_path: Path) -> None:
    workflow = tmp_path / "demo"
    shutil.copytree(EXAMPLES / "demo", workflow)  # Snakemake writes .snakemake/ where it runs
    named = named_in_opening_comment(workflow / "Snakefile")
    assert named - rules_of(workflow) == set(), named
    assert {"preprocess", "train", "evaluate", "all"} <= named
