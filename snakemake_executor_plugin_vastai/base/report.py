"""What a person watching the run reads while instances rent, boot, work and go: every
progress line is said here, marked so that the program running us can hide it (Snakemake's
``--quiet`` hides these as it hides its own "3 of 9 steps").

Why apart from the rooms that say them: the pool, the remote side and the Snakemake edge all
speak to the same person, and only the edge knows how Snakemake tells progress apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from snakemake_executor_plugin_vastai.base.logger import get_logger

log = get_logger(__name__)

SLOW_TRANSFER_SECONDS = 1.0  # faster transfers are not worth a line
_MARK: dict[str, Any] = {}  # see mark_progress


def mark_progress(fields: Mapping[str, Any]) -> None:
    """The record fields by which the program that runs us tells a progress line from the
    rest: Snakemake's ``--quiet`` filter reads ``quietness`` (set by the executor, which
    knows Snakemake; the ``snakemake-vastai`` command has no such filter and sets none)."""
    _MARK.clear()
    _MARK.update(fields)


def say(message: str, *args: object) -> None:
    """One progress line at INFO."""
    log.info(message, *args, extra=dict(_MARK))


def count(number: int, noun: str) -> str:
    """The number with its noun, plural unless one: "1 job", "2 jobs"."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def human_bytes(size: float) -> str:
    """Decimal units, as network rates are quoted: "48.2 MB"."""
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def transfer(verb: str, size: int, seconds: float, where: str) -> None:
    """A line for a transfer slow enough to notice ("Uploaded 48.2 MB to instance 12 for
    make-3-a1 in 3.1 s (15.5 MB/s)")."""
    if seconds > SLOW_TRANSFER_SECONDS:
        rate = human_bytes(size / seconds)
        say("%s %s %s in %.1f s (%s/s)", verb, human_bytes(size), where, seconds, rate)
