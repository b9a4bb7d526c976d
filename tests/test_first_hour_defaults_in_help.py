"""``snakemake --help`` is where a new user looks first: every ``--vastai-*`` option says its
default there, and the default it names is the one the code uses (issue 20, item 2)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields

from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings

SECTION = "vastai executor plugin settings:"


def vastai_help() -> dict[str, str]:
    """Each ``--vastai-*`` option's help as the real ``snakemake --help`` prints it, with all
    whitespace removed: argparse wraps lines anywhere, hyphens included."""
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    section = done.stdout.split(SECTION, 1)[1].split("\n\n", 1)[0]
    blocks = re.split(r"^  (?=--vastai-)", section, flags=re.MULTILINE)[1:]
    return {block.split()[0]: "".join(block.split()[1:]) for block in blocks}


def flag(name: str) -> str:
    return "--vastai-" + name.replace("_", "-")


def default_pattern(default: object) -> str:
    """What the help's "Default:" must say: a switch is off, a value is itself (and not a
    longer one: 400 for 40), and a setting without a value (None) says what happens then."""
    if isinstance(default, bool):
        return r"Default:off(?!\w)"
    if default is None:
        return r"Default:[^.]"
    return re.escape(f"Default:{default}") + r"(?!\w)"


def test_every_option_says_its_real_default_in_snakemakes_help() -> None:
    shown = vastai_help()
    settings = fields(ExecutorSettings)
    assert sorted(shown) == sorted(flag(s.name) for s in settings)
    for setting in settings:
        text = shown[flag(setting.name)]
        assert text.count("Default:") == 1, (setting.name, text)
        assert re.search(default_pattern(setting.default), text), (setting.name, text)
