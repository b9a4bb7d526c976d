"""Recent offer searches, shared for a minute by every process of one API key on this machine.

Why: Vast.ai allows ten searches a minute per key. `snakemake-vastai offers` and the run that
follows it, or two workflows started together, ask the same queries; the later one takes
the earlier one's answer while it is as fresh as a run's own copy may be. Offers are public
market data; the file never holds the key (see ``keyfiles``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from snakemake_executor_plugin_vastai.market.keyfiles import locked_json
from snakemake_executor_plugin_vastai.market.marketplace import Offer


@dataclass
class OfferShelf:
    """Answers by search (query, order, disk, interruptible), each with when it was made."""

    path: Path
    ttl: float
    clock: Callable[[], float] = field(default=time.time)

    def get(self, search: tuple[str, str, int, bool]) -> tuple[float, list[Offer]] | None:
        """(its age in seconds, the offers) of a fresh answer to ``search``, else None."""
        with locked_json(self.path) as shelf:
            entry = shelf.get(_name(search))
        try:
            age = self.clock() - float(entry["at"])
            offers = [Offer(**row) for row in entry["offers"]]
        except (KeyError, TypeError, ValueError):  # none, or not one this version wrote
            return None
        return (age, offers) if 0 <= age < self.ttl else None

    def put(self, search: tuple[str, str, int, bool], offers: list[Offer]) -> None:
        now = self.clock()
        with locked_json(self.path) as shelf:
            for name in [name for name, entry in shelf.items() if not _fresh(entry, now, self)]:
                del shelf[name]
            shelf[_name(search)] = {"at": now, "offers": [asdict(offer) for offer in offers]}

    def drop(self, offer_id: int) -> None:
        """An offer is taken: no process of this key is offered it again from here."""
        with locked_json(self.path) as shelf:
            for entry in shelf.values():
                if isinstance(entry, dict) and isinstance(entry.get("offers"), list):
                    entry["offers"] = [o for o in entry["offers"] if _id(o) != offer_id]


def _name(search: tuple[str, str, int, bool]) -> str:
    return json.dumps(list(search))


def _fresh(entry: Any, now: float, shelf: OfferShelf) -> bool:
    try:
        return 0 <= now - float(entry["at"]) < shelf.ttl
    except (KeyError, TypeError, ValueError):
        return False


def _id(row: Any) -> object:
    return row.get("id") if isinstance(row, dict) else None
