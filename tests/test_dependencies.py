"""Every third-party package the plugin imports is declared in pyproject.toml.

Why: an undeclared one works only while something else happens to bring it along (cryptography
came with paramiko and vastai); a new release of those may drop it, and the plugin then fails
at import on a user's machine while every test here passes.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.workflows import REPO

PACKAGE = REPO / "snakemake_executor_plugin_vastai"
# Snakemake loads the plugin, so it is there wherever the plugin runs (onhost/runner.py uses
# the one on the instance); declaring it would tie the user's Snakemake to the plugin's pin.
PROVIDED = {"snakemake"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {normalise(re.match(r"[A-Za-z0-9._-]+", r)[0]) for r in project["dependencies"]}


def imported(path: Path) -> set[str]:
    """Top-level names of the absolute imports in one source file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
    return found


def test_every_third_party_import_is_a_declared_dependency() -> None:
    distributions = packages_distributions()
    wanted = declared()
    undeclared: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for module in imported(path):
            if module in sys.stdlib_module_names or module in PROVIDED | {PACKAGE.name}:
                continue
            if not {normalise(d) for d in distributions.get(module, [module])} & wanted:
                undeclared.setdefault(module, []).append(str(path.relative_to(REPO)))
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"
