"""The API's error envelope, so every layer raises the exact bodies vast-api.md documents."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An HTTP error answer: status code plus the JSON body the real API would send."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body


def api_error(status: int, error: str, msg: str, **extra: Any) -> ApiError:
    """The usual ``{"success": false, "error", "msg"}`` envelope, plus endpoint extras."""
    return ApiError(status, {"success": False, "error": error, "msg": msg, **extra})


def invalid_request(msg: str) -> ApiError:
    """400 for a query the API cannot parse (bad filter field, operator, value or token)."""
    return api_error(400, "invalid_request", msg)


def no_such_instance(instance_id: object) -> ApiError:
    """404 for an unknown or destroyed instance; dstack tolerates exactly this error code."""
    return api_error(404, "no_such_instance", f"Instance {instance_id} not found.")


def forbidden(msg: str) -> ApiError:
    """403 for a valid key that may not do this: an instance's scoped key outside its scope."""
    return api_error(403, "forbidden", msg)
