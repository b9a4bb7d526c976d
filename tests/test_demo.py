"""The README's first command, as a newcomer runs it: the demo workflow end to end against
the bundled fake with Vast.ai's rate limits on, nothing left running, no call refused, and
no noise from the plugin's internals in what the user reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.workflows import REPO


def test_the_demo_runs_end_to_end_within_the_markets_rules(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr

    assert done.returncode == 0, output
    assert "Snakemake exited with 0." in output, output
    assert "and has 0 left running. Calls it refused under Vast.ai's rate limits: 0." in output
    assert (tmp_path / "demo" / "results" / "summary report.txt").is_file()
    for noise in ("Traceback", "skipped: maximum number of running instances", "HTTP 429"):
        assert noise not in output, noise
