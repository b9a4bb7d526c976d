"""The base of the plugin's own errors.

Why not Snakemake's ``WorkflowError`` everywhere: each layer (marketplace, resources, pool,
staging) raises its own types and knows nothing of Snakemake; only ``__init__.py`` turns them
into ``WorkflowError`` (or a failed job's message) at the boundary.
"""

from __future__ import annotations


class VastaiError(Exception):
    """A failure the user can act on; its message says what happened and how to fix it."""
