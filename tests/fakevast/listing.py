"""``GET /api/v1/instances/``: filters, ordering and keyset paging over instance rows.

Pages hold at most 25 rows. ``next_token`` encodes the sort key of the last row served, so a
page boundary stays correct while instances come and go between calls; it is null on the last
page, which is what ends the SDK's paging loop.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from .errors import invalid_request
from .query import (
    Order,
    Row,
    check_order,
    compile_filters,
    decode_token,
    encode_token,
    row_comparator,
    sort_rows,
)

MAX_PAGE = 25


def _resolve(row: Row, field: str) -> Any:
    return row.get(field)


def _json_arg(query: Mapping[str, str], name: str, default: Any) -> Any:
    if name not in query:
        return default
    try:
        return json.loads(query[name])
    except ValueError:
        raise invalid_request(f"Error in query parameters: {name} is not valid JSON") from None


def _order(raw: Any) -> Order:
    if not isinstance(raw, list):
        raise invalid_request("Error in query parameters: order_by must be a list")
    order = []
    for item in raw:
        if not (isinstance(item, dict) and isinstance(item.get("col"), str)):
            raise invalid_request(f"Error in query parameters: bad order_by entry {item!r}")
        direction = item.get("dir", "asc")
        if direction not in ("asc", "desc"):
            raise invalid_request(f"Error in query parameters: bad direction {direction!r}")
        order.append((item["col"], direction == "desc"))
    return order


def list_page(rows: list[Row], query: Mapping[str, str]) -> dict[str, Any]:
    """One page of `rows` (all of the user's live instances) for the request's query args.

    Field names are checked against the rows' keys; with no rows there is nothing to check
    against, and nothing to return either.
    """
    fields = set(rows[0]) if rows else None
    filters = _json_arg(query, "select_filters", {})
    if not isinstance(filters, dict):
        raise invalid_request("Error in query parameters: select_filters must be an object")
    order = _order(_json_arg(query, "order_by", [{"col": "id", "dir": "asc"}]))
    limit = _json_arg(query, "limit", MAX_PAGE)
    if type(limit) is not int or limit < 1:
        raise invalid_request(f"Error in query parameters: bad limit {limit!r}")
    if fields is not None:
        check_order(order, fields)
    predicate = compile_filters(filters, fields if fields is not None else set(filters), _resolve)
    found = sort_rows([row for row in rows if predicate(row)], order, _resolve)
    remaining = found
    if "after_token" in query:
        values = decode_token(query["after_token"], len(order) + 1)
        last = {**dict(zip([f for f, _ in order], values, strict=False)), "id": values[-1]}
        compare = row_comparator(order, _resolve)
        remaining = [row for row in found if compare(row, last) > 0]
    page = remaining[: min(limit, MAX_PAGE)]
    next_token = None
    if len(remaining) > len(page):
        tail = page[-1]
        next_token = encode_token([tail.get(f) for f, _ in order] + [tail["id"]])
    return {
        "success": True,
        "instances": page,
        "instances_found": len(found),
        "total_instances": len(rows),
        "label_counts": dict(Counter(row.get("label") or "" for row in rows)),
        "next_token": next_token,
    }
