"""The offer catalogue: loading, search filters, ordering and pricing of ``POST /bundles/``.

Filter semantics follow vast-api.md §3.1: operands are coerced to the field's type, ``verified``
means ``verification == "verified"``, ``datacenter`` means ``hosting_type == 1``, a null
``external`` counts as false, and ``geolocation`` is compared on its 2-letter country code.
A field that no offer carries is a 400 ``invalid_request``, so a typo in a client's query fails
loudly instead of silently matching everything.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import invalid_request
from .query import Row, check_order, compile_filters, sort_rows

DEFAULT_OFFERS = Path(__file__).with_name("offers.json")

# What a catalogue entry gets for every field it leaves out, so a test can write minimal offers.
_DEFAULTS: dict[str, Any] = {
    "num_gpus": 1,
    "gpu_name": "RTX 4090",
    "gpu_arch": "nvidia",
    "gpu_ram": 24564,
    "gpu_mem_bw": 912.0,
    "gpu_max_power": 450.0,
    "gpu_max_temp": 83.0,
    "gpu_display_active": False,
    "bw_nvlink": 0.0,
    "compute_cap": 890,
    "cpu_arch": "amd64",
    "cpu_name": "AMD EPYC 7543 32-Core Processor",
    "cpu_cores": 64,
    "cpu_cores_effective": 16.0,
    "cpu_ghz": 3.7,
    "cpu_ram": 64331,
    "cuda_max_good": 12.4,
    "driver_version": "550.54.14",
    "disk_bw": 3100.0,
    "disk_space": 250.0,
    "disk_name": "Samsung SSD 980 PRO 2TB",
    "dlperf": 80.4,
    "total_flops": 82.6,
    "dph_base": 0.4,
    "storage_cost": 0.15,
    "min_bid": 0.25,
    "is_bid": False,
    "inet_down": 900.0,
    "inet_up": 800.0,
    "inet_down_cost": 0.002,
    "inet_up_cost": 0.002,
    "reliability": 0.995,
    "reliability2": 0.995,
    "geolocation": "Oregon, US",
    "hosting_type": 0,
    "verification": "verified",
    "rentable": True,
    "rented": False,
    "external": False,
    "direct_port_count": 20,
    "score": 100.0,
    "duration": 30 * 86400.0,
    "public_ipaddr": "127.0.0.1",
    "static_ip": True,
    "has_avx": 1,
    "mobo_name": "ROMED8-2T",
    "pci_gen": 4.0,
    "pcie_bw": 25.1,
    "ubuntu_version": "22.04",
    "vms_enabled": False,
    "cluster_id": None,
}
# Filters the API evaluates on something other than a stored column.
_VIRTUAL_FIELDS = frozenset({"verified", "datacenter"})
# Body keys of a search that are not filters.
_DIRECTIVES = frozenset({"order", "type", "limit", "allocated_storage", "disable_bundling"})
_TYPES = {"on-demand": "on-demand", "ondemand": "on-demand", "bid": "bid", "reserved": "reserved"}
_HOURS_PER_MONTH = 720


def numeric_version(text: Any) -> Any:
    """``"535.86.05"`` -> ``535086005``, the form the SDK sends for driver_version filters."""
    if not isinstance(text, str) or "." not in text:
        return text
    try:
        return int("".join(part.zfill(3) for part in text.split(".")))
    except ValueError:
        return text


def country(text: Any) -> Any:
    """The 2-letter code a geolocation is matched on (``"Warsaw, PL"`` -> ``"PL"``)."""
    return text.strip()[-2:].upper() if isinstance(text, str) and text.strip() else text


def _resolve(offer: Row, field: str) -> Any:
    if field == "verified":
        return offer.get("verification") == "verified"
    if field == "datacenter":
        return offer.get("hosting_type") == 1
    if field == "external":
        return bool(offer.get("external"))
    if field == "geolocation":
        return country(offer.get("geolocation"))
    if field == "driver_version":
        return numeric_version(offer.get("driver_version"))
    return offer.get(field)


def _normalise_operand(field: str, operand: Any) -> Any:
    """Bring operands into the form `_resolve` compares against."""
    convert = {"geolocation": country, "driver_version": numeric_version}.get(field)
    if convert is None:
        return operand
    if isinstance(operand, list):
        return [convert(item) for item in operand]
    return convert(operand)


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise invalid_request(f"{key} must be a number, got {value!r}") from None


def _parse_order(raw: Any) -> list[tuple[str, bool]]:
    if raw is None:
        return [("score", True)]
    if not isinstance(raw, list):
        raise invalid_request("order must be a list of [field, direction] pairs")
    order = []
    for item in raw:
        if not (isinstance(item, list | tuple) and len(item) == 2 and item[1] in ("asc", "desc")):
            raise invalid_request(f"order entry {item!r} is not [field, 'asc'|'desc']")
        order.append((str(item[0]), item[1] == "desc"))
    return order


@dataclass(frozen=True)
class Catalog:
    """All offers of the marketplace by id; which of them are free is the market's business."""

    offers: Mapping[int, Row]
    fields: frozenset[str]

    @classmethod
    def load(cls, path: Path = DEFAULT_OFFERS) -> Catalog:
        entries = json.loads(Path(path).read_text())
        listed_at = time.time() - 7 * 86400
        offers: dict[int, Row] = {}
        for entry in entries:
            offer_id = int(entry["id"])
            if offer_id in offers:
                raise ValueError(f"{path}: offer id {offer_id} appears twice")
            offer = {**_DEFAULTS, **entry, "id": offer_id}
            for key in ("ask_contract_id", "bundle_id", "machine_id", "host_id"):
                offer.setdefault(key, offer_id)
            offer.setdefault("gpu_total_ram", offer["gpu_ram"] * offer["num_gpus"])
            offer.setdefault("gpu_frac", machine_share(offer))
            offer.setdefault("start_date", listed_at)
            offer.setdefault("end_date", listed_at + offer["duration"])
            offers[offer_id] = offer
        fields = frozenset().union(*(o.keys() for o in offers.values()))
        extra = {"dph_total", "dlperf_per_dphtotal", "flops_per_dphtotal"}
        return cls(offers, fields | _VIRTUAL_FIELDS | extra)

    def search(self, body: Mapping[str, Any], unavailable: Collection[int]) -> list[Row]:
        """The ``offers`` list for a search body; offers in `unavailable` are invisible."""
        kind = _TYPES.get(body.get("type", "on-demand"))
        if kind is None:
            raise invalid_request(f"type must be one of {sorted(_TYPES)}, got {body['type']!r}")
        storage = _number(body, "allocated_storage", 5.0)
        limit = body.get("limit")
        if limit is not None and (type(limit) is not int or limit < 1):
            raise invalid_request(f"limit must be a positive integer, got {limit!r}")
        filters = {
            field: {op: _normalise_operand(field, v) for op, v in cond.items()}
            if isinstance(cond, dict)
            else cond
            for field, cond in body.items()
            if field not in _DIRECTIVES
        }
        predicate = compile_filters(filters, self.fields, _resolve)
        order = check_order(_parse_order(body.get("order")), self.fields)
        priced = [
            price(offer, kind, storage)
            for offer_id, offer in self.offers.items()
            if offer_id not in unavailable
        ]
        found = sort_rows([o for o in priced if predicate(o)], order, _resolve)
        return found[:limit] if limit else found


def machine_share(offer: Row) -> float:
    """The offer's share of its machine when the entry does not give `gpu_frac`:
    cpu_cores_effective / cpu_cores, as dstack's gpuhunt derives it (vast-api.md §10: an
    instance gets RAM and CPU in proportion to its share of the machine's GPUs, and
    cpu_cores_effective is already that share), so that the two ways to the share agree."""
    cores, effective = offer.get("cpu_cores"), offer.get("cpu_cores_effective")
    return effective / cores if cores and effective else 1.0


def price(offer: Row, kind: str, storage_gb: float) -> dict[str, Any]:
    """The offer as the search shows it: dph_total = base (min_bid for bids) + storage/hour."""
    base = offer["min_bid"] if kind == "bid" else offer["dph_base"]
    total = base + storage_per_hour(offer, storage_gb)
    return {
        **offer,
        "is_bid": kind == "bid",
        "dph_total": total,
        "dlperf_per_dphtotal": offer["dlperf"] / total if total else None,
        "flops_per_dphtotal": offer["total_flops"] / total if total else None,
    }


def storage_per_hour(offer: Row, disk_gb: float) -> float:
    return offer["storage_cost"] * disk_gb / _HOURS_PER_MONTH
