"""The import contract in pyproject.toml (`[tool.importlinter]`) holds: the rooms import
downward only, each outside library is reached through its one module, Snakemake only at the
edge, what runs on a rented machine imports nothing of ours (and, read here, nothing but the
standard library), and no two modules import each other, directly or around a loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contract_is_kept() -> None:
    checked = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "BROKEN" not in checked.stdout, checked.stdout


ONHOST = ROOT / "snakemake_executor_plugin_vastai" / "remote" / "onhost"
# What each program on the host may import besides the standard library: the runner runs the
# job's Snakemake, which is on the instance (the bootstrap installs it when the image lacks it).
ONHOST_EXTRA = {"runner.py": {"snakemake"}}


def imported_top_names(path: Path) -> set[str]:
    """The top-level names of every absolute import in one file, in functions too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))  # relative: ours, never allowed
    return names


def test_the_programs_on_the_host_import_only_the_standard_library() -> None:
    programs = sorted(ONHOST.glob("*.py"))
    assert {p.name for p in programs} >= {"agent.py", "runner.py", "watchdog.py"}

    for program in programs:
        allowed = (
            set(sys.stdlib_module_names) | {"__future__"} | ONHOST_EXTRA.get(program.name, set())
        )
        outside = imported_top_names(program) - allowed
        assert not outside, f"{program.name} imports {sorted(outside)}"
