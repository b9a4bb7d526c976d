"""Keeps the user's API key out of every line Snakemake prints or logs.

Why here and not in the executor: Snakemake prints its own command line ("Command: ...") when
the workflow starts, before any executor exists, so ``--vastai-api-key KEY`` would otherwise
land on the terminal and in ``.snakemake/log/*.snakemake.log``. The filter sits on Snakemake's
logger, so it covers every handler that logger feeds (terminal, log file, logger plugins).
"""

from __future__ import annotations

import logging
from typing import Any

SNAKEMAKE_LOGGER = "snakemake.logging"
MASK = "***"
MIN_SECRET_CHARS = 4
"""Shorter values are not masked: replacing them would garble ordinary text."""


class SecretFilter(logging.Filter):
    """Replaces each secret in a record's message, arguments and extra fields."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def scrub(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        for secret in self.secrets:
            value = value.replace(secret, MASK)
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in list(vars(record).items()):
            if isinstance(value, str):
                setattr(record, name, self.scrub(value))
        if isinstance(record.args, tuple):
            record.args = tuple(self.scrub(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: self.scrub(arg) for key, arg in record.args.items()}
        return True


_SHARED = SecretFilter()


def secret_filter() -> SecretFilter:
    """The one filter of the process, on Snakemake's logger. Python runs a logger's filters
    only on records logged to that very logger, never on its children's, so each of the
    plugin's own loggers carries it too (``logger.get_logger``)."""
    logger = logging.getLogger(SNAKEMAKE_LOGGER)
    if _SHARED not in logger.filters:
        logger.addFilter(_SHARED)
    return _SHARED


def hide_in_snakemake_logs(secret: str) -> None:
    """From now on, ``secret`` appears in no record of Snakemake's logger or the plugin's
    (idempotent)."""
    if len(secret) < MIN_SECRET_CHARS:
        return
    secret_filter().secrets.add(secret)
