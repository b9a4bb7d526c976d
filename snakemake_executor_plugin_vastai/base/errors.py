"""The plugin's one family of errors, and its kinds.

Why not Snakemake's ``WorkflowError`` everywhere: each layer (marketplace, resources, pool,
staging) raises its own types and knows nothing of Snakemake; only ``__init__.py`` turns them
into a failed job's message, or an ``ApiError`` when a mistake stops the whole run (printed
as a message, without a traceback).

Why kinds: what the edge does depends on whose fault it is. The marketplace refusing or
failing, a rented machine failing (its machine is then not rented again), and the user's own
input (the message names the fix, found before anything is rented where it can be) are all
:class:`VastaiError`, shown as a message. A :class:`PluginBug` is not one: no ``except
VastaiError`` swallows it, and the edge reports it as an internal error with its traceback,
so a bug never reads as the user's mistake, nor the reverse.
"""

from __future__ import annotations


class PluginError(Exception):
    """The base of every error this package raises (outside ``onhost/``, which stands alone)."""


class VastaiError(PluginError):
    """A failure the user can act on; its message says what happened and how to fix it."""


class MarketError(VastaiError):
    """Vast.ai's API refused a call, failed, or could not be reached; or no offer fits."""


class HostError(VastaiError):
    """A rented machine failed: it did not boot, its SSH broke, or what it sent back was
    wrong. Its machine is not rented again in the run."""


class UserError(VastaiError):
    """The user's options, resources or workflow are wrong; the message names the fix."""


class PluginBug(PluginError, RuntimeError):
    """An invariant of the plugin broke: never the user's fault, reported with its traceback."""
