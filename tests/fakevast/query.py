"""The filter and ordering language shared by offer search and the v1 instance list.

Filters arrive as ``{field: {op: operand}}``. The SDK sends numbers as strings (``"0.98"``), so
every operand is coerced to the type of the value it is compared with, as the real API does.
"""

from __future__ import annotations

import base64
import binascii
import json
import operator
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import cmp_to_key
from typing import Any

from .errors import ApiError, api_error, invalid_request

Row = Mapping[str, Any]
Resolver = Callable[[Row, str], Any]
Order = list[tuple[str, bool]]  # (field, descending)

_ORDERING = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}
OPERATORS = frozenset({"eq", "neq", "in", "notin", *_ORDERING})


def unknown_field(field: str) -> ApiError:
    return invalid_request(f"Error in query parameters: {field} is not a valid search key")


def _coerce(operand: Any, like: Any) -> Any:
    """`operand` converted to the type of `like`; a value that cannot be converted is a 400."""
    if isinstance(like, bool):
        if isinstance(operand, bool):
            return operand
        text = str(operand).strip().lower()
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
    elif isinstance(like, int | float):
        if isinstance(operand, int | float) and not isinstance(operand, bool):
            return operand
        try:
            return float(operand)
        except (TypeError, ValueError):
            pass
    elif isinstance(like, str):
        return operand if isinstance(operand, str) else json.dumps(operand)
    else:
        return operand
    raise invalid_request(f"Error in query parameters: invalid value {operand!r}")


def _equal(value: Any, operand: Any) -> bool:
    if operand is None or value is None:
        return value is operand
    return value == _coerce(operand, value)


def matches(value: Any, op: str, operand: Any) -> bool:
    """One comparison; a null value only equals null and never orders (SQL-like)."""
    if op in ("in", "notin"):
        if not isinstance(operand, list):
            raise invalid_request(f"Error in query parameters: '{op}' needs a list")
        hit = any(_equal(value, item) for item in operand)
        return hit if op == "in" else not hit
    if op == "eq":
        return _equal(value, operand)
    if op == "neq":
        return not _equal(value, operand)
    if value is None or operand is None:
        return False
    return _ORDERING[op](value, _coerce(operand, value))


def compile_filters(
    filters: Mapping[str, Any], fields: Collection[str], resolve: Resolver
) -> Callable[[Row], bool]:
    """Validate `filters` up front (unknown field or operator: 400) and return a row predicate."""
    checks: list[tuple[str, str, Any]] = []
    for field, condition in filters.items():
        if field not in fields:
            raise unknown_field(field)
        if not isinstance(condition, dict):
            raise invalid_request(f"Error in query parameters: {field} needs {{op: value}}")
        for op, operand in condition.items():
            if op not in OPERATORS:
                raise invalid_request(f"Error in query parameters: unknown operator {op!r}")
            checks.append((field, op, operand))

    def predicate(row: Row) -> bool:
        return all(matches(resolve(row, field), op, operand) for field, op, operand in checks)

    return predicate


def check_order(order: Order, fields: Collection[str]) -> Order:
    for field, _ in order:
        if field not in fields:
            raise unknown_field(field)
    return order


def row_comparator(order: Order, resolve: Resolver) -> Callable[[Row, Row], int]:
    """Compare rows by `order`, nulls last in either direction, ties broken by ascending id."""

    def compare(a: Row, b: Row) -> int:
        for field, descending in [*order, ("id", False)]:
            x, y = resolve(a, field), resolve(b, field)
            if x == y:
                continue
            if x is None or y is None:
                return 1 if x is None else -1
            result = -1 if x < y else 1
            return -result if descending else result
        return 0

    return compare


def sort_rows(rows: Sequence[Row], order: Order, resolve: Resolver) -> list[Row]:
    return sorted(rows, key=cmp_to_key(row_comparator(order, resolve)))


def encode_token(values: Sequence[Any]) -> str:
    """An opaque page token: the sort key of the last row served (keyset paging)."""
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode()


def invalid_token() -> ApiError:
    return api_error(400, "invalid_token", "Error in query parameters: invalid after_token")


def decode_token(token: str, length: int) -> list[Any]:
    """The `length` sort values a token carries; anything else is a 400 invalid_token."""
    try:
        values = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise invalid_token() from None
    if not isinstance(values, list) or len(values) != length:
        raise invalid_token()
    return values
