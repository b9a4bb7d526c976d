"""The README's options table is the user's reference: it must name every option the plugin
has, with the default the code really uses."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings

README = Path(__file__).resolve().parent.parent / "README.md"

# How the table writes a default that is not a plain number or string.
WORDS_FOR_NONE = {"none", "any", "anywhere", "all", "--jobs"}


def options_table() -> dict[str, str]:
    """flag -> default cell, from the table under "## Options"."""
    section = README.read_text().split("## Options", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(--vastai-[a-z-]+)` \| ([^|]+) \|", section, re.MULTILINE)
    return {flag: cell.strip() for flag, cell in rows}


def flag(name: str) -> str:
    return "--vastai-" + name.replace("_", "-")


def test_the_table_names_every_option_once() -> None:
    section = README.read_text().split("## Options", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `(--vastai-[a-z-]+)` \|", section, re.MULTILINE)
    assert sorted(listed) == sorted(flag(f.name) for f in fields(ExecutorSettings))


def test_the_table_gives_the_real_defaults() -> None:
    table = options_table()
    for setting in fields(ExecutorSettings):
        assert setting.default is not MISSING, setting.name
        cell = table[flag(setting.name)]
        first = cell.split(",")[0].split(" (")[0].strip("` ")
        default = setting.default
        if isinstance(default, bool):
            assert first == ("on" if default else "off"), (setting.name, cell)
        elif default is None:
            words = {w.strip("`").lower() for w in re.split(r"[ ,]+", cell)}
            assert words & WORDS_FOR_NONE or "VAST_" in cell, (setting.name, cell)
        else:
            assert first == str(default), (setting.name, cell)
