"""The import contract in pyproject.toml (`[tool.importlinter]`) holds: each outside library
is reached through its one module, Snakemake only at the edge, what runs on a rented machine
imports nothing of ours, and no two modules import each other, directly or around a loop."""

from __future__ import annotations

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
