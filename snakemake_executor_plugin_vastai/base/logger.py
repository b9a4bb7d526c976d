"""Where the plugin's messages go: children of Snakemake's own logger, so they show up in its
terminal output, its log file and logger plugins, at the level the user chose (``--verbose``
shows the debug lines, such as each generated offer query)."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from snakemake_executor_plugin_vastai.base.redact import SNAKEMAKE_LOGGER, secret_filter


class EagerLogger(logging.LoggerAdapter):
    """Snakemake's handlers print ``record.msg`` as it is, without its arguments, so the
    message is formatted before it becomes a record."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            self.logger.log(level, str(msg) % args if args else msg, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs


def get_logger(module: str) -> EagerLogger:
    name = f"{SNAKEMAKE_LOGGER}.vastai.{module.rsplit('.', 1)[-1]}"
    logger = logging.getLogger(name)
    if secret_filter() not in logger.filters:
        logger.addFilter(secret_filter())
    return EagerLogger(logger, {})
