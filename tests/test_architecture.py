"""The import contract in pyproject.toml (`[tool.importlinter]`) holds: the rooms import
downward only, each outside library is reached through its one module, Snakemake only at the
edge, what runs on a rented machine imports nothing of ours (and, read here, nothing but the
standard library), and no two modules import each other, directly or around a loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.test_dependencies import imported

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


def relative_imports(path: Path) -> list[str]:
    """The relative imports in one file (each one of ours, so never allowed on the host)."""
    tree = ast.parse(path.read_text())
    return [
        "." * node.level + (node.module or "")
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level
    ]


def test_the_programs_on_the_host_import_only_the_standard_library() -> None:
    programs = sorted(ONHOST.glob("*.py"))
    assert {p.name for p in programs} >= {"agent.py", "runner.py", "watchdog.py"}

    for program in programs:
        allowed = (
            set(sys.stdlib_module_names) | {"__future__"} | ONHOST_EXTRA.get(program.name, set())
        )
        outside = sorted(imported(program) - allowed) + relative_imports(program)
        assert not outside, f"{program.name} imports {outside}"
