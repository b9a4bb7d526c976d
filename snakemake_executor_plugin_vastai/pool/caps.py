"""The run-wide limits on renting: instance count, summed $/h and the dollar budget.

Why pure functions: the decision "may one more instance at this price be rented now?" is
made under the instance table's lock with the table's own figures (reservations included),
and must be testable with a frozen clock.
"""

from __future__ import annotations

from dataclasses import dataclass

BUDGET_HORIZON_SECONDS = 900.0  # a new rent must leave room for this long at the full rate


@dataclass(frozen=True)
class Caps:
    max_instances: int = 1
    max_total_price: float | None = None
    budget: float | None = None


def rent_refusal(rate: float, price: float, spend: float, caps: Caps) -> str | None:
    """Why renting one more instance at ``price`` $/h is not allowed now; None allows it.

    ``rate`` is what the run's counted instances (reservations included) cost per hour,
    ``spend`` what the run has cost so far.
    """
    if caps.max_total_price is not None and rate + price > caps.max_total_price + 1e-9:
        return (
            f"renting at ${price:.3f}/h would take the run to ${rate + price:.3f}/h, above "
            f"--vastai-max-total-price ${caps.max_total_price:.3f}/h"
        )
    projected = spend + (rate + price) * BUDGET_HORIZON_SECONDS / 3600.0
    if caps.budget is not None and projected > caps.budget:
        return (
            f"the run has spent ${spend:.4f}; renting at ${price:.3f}/h could take it past "
            f"--vastai-budget ${caps.budget:.2f} within {BUDGET_HORIZON_SECONDS / 60:.0f} min"
        )
    return None
