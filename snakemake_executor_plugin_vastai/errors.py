"""The base of the plugin's own errors.

Why not Snakemake's ``WorkflowError`` everywhere: each layer (marketplace, resources, pool,
staging) raises its own types and knows nothing of Snakemake; only ``__init__.py`` turns them
into a failed job's message, or an ``ApiError`` when a mistake stops the whole run (printed
as a message, without a traceback).
"""

from __future__ import annotations


class VastaiError(Exception):
    """A failure the user can act on; its message says what happened and how to fix it."""
