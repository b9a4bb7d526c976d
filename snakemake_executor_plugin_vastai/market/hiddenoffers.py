"""Cheaper offers that only the safe defaults keep out, said in one line.

Why: the defaults (datacenter hosts, reliability 0.98) are right for a first run but hide
the cheapest offers; a user who never sees them cannot choose them. ``offers`` and the
run's first rent say what they leave out and which option lets it in: advice, one extra
search, never a reason to stop."""

from __future__ import annotations

from dataclasses import dataclass, replace

from snakemake_executor_plugin_vastai.base.errors import VastaiError
from snakemake_executor_plugin_vastai.market.defaults import DEFAULT_RELIABILITY
from snakemake_executor_plugin_vastai.market.diagnosis import Search
from snakemake_executor_plugin_vastai.market.marketplace import Offer
from snakemake_executor_plugin_vastai.market.request import ResourceRequest

HIDDEN_LIMIT = 100
"""Offers the search without the defaults counts (cheapest first); more are said as "100+"."""


@dataclass(frozen=True)
class HiddenOffers:
    """Offers cheaper than the cheapest the request finds, that only the safe defaults the
    user left as they are keep out."""

    count: int
    at_least: bool  # the search stopped at its limit: there may be more
    cheapest: float  # $/h
    left_out: tuple[tuple[str, str], ...]  # (what the defaults leave out, the option)

    def sentence(self) -> str:
        offers = f"{self.count}{'+' if self.at_least else ''} cheaper offer"
        offers += "" if self.count == 1 else "s"
        parts = " and ".join(f"{what} ({option})" for what, option in self.left_out)
        return f"The defaults leave out {offers} (from ${self.cheapest:.3f}/h): {parts}."


def hidden_by_defaults(
    request: ResourceRequest, visible: list[Offer], search: Search
) -> HiddenOffers | None:
    """One search without the defaults the user did not change (datacenters only,
    reliability 0.98): what it finds below the cheapest of ``visible`` (what the request
    finds). None when nothing is cheaper, when the user chose those filters, for bids
    (priced otherwise than the search), or when the search fails: this is advice, never a
    reason to stop."""
    relaxed = _without_defaults(request)
    if relaxed is None or not visible or request.interruptible:
        return None
    try:
        found = search(relaxed, HIDDEN_LIMIT)
    except VastaiError:
        return None
    floor = min(offer.dph_total for offer in visible)
    cheaper = [offer for offer in found if offer.dph_total < floor]
    left_out = []
    if request.datacenter_only and not relaxed.datacenter_only:
        left_out.append(("hosts outside datacenters", "--vastai-no-datacenter"))
    lower = relaxed.reliability < request.reliability
    if lower and any(offer.reliability < request.reliability for offer in cheaper):
        below = f"reliability below {request.reliability:g}"
        left_out.append((below, "--vastai-reliability"))
    if not (cheaper and left_out):
        return None
    full = len(found) >= HIDDEN_LIMIT and len(cheaper) == len(found)
    cheapest = min(offer.dph_total for offer in cheaper)
    return HiddenOffers(len(cheaper), full, cheapest, tuple(left_out))


def _without_defaults(request: ResourceRequest) -> ResourceRequest | None:
    """The request without the safe defaults the user left as they are (a filter the
    user's own query names counts as chosen); None when none is left."""
    chosen = request.extra_query
    changes: dict[str, object] = {}
    if request.datacenter_only and "datacenter" not in chosen:
        changes["datacenter_only"] = False
    if request.reliability == DEFAULT_RELIABILITY and "reliability" not in chosen:
        changes["reliability"] = 0.0
    return replace(request, **changes) if changes else None
