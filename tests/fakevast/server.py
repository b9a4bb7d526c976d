"""The HTTP front: routing, authentication, JSON envelopes, the request log and HTTP faults.

Two kinds of key are accepted: the user's (everything) and each instance's scoped
``CONTAINER_API_KEY`` (show, state change and destroy of that one instance; 403 otherwise).
Paths are served with or without a trailing slash and with repeated slashes collapsed (the SDK
sends ``//api/...`` when its server_url ends in a slash). ``/_fake/*`` is the control plane for
tests: no auth, not counted or logged, not subject to faults or rate limits.

A request is answered in this order: 401 (unknown key), 403 (a scoped key out of its scope), 429
(Vast.ai's rate limits and search quota, `limits.py`), an HTTP fault rule, then the handler.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import re
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .errors import ApiError, api_error, forbidden, invalid_request
from .faults import normalise_path
from .limits import Identity, LimitsError
from .market import Market

JSON = "application/json"
_UNAUTHORIZED = {"success": False, "error": "auth_error", "msg": "Invalid user key"}
_FAKE_BUG = {"success": False, "error": "server_error", "msg": "fake bug"}
_PLACEHOLDER = re.compile(r"\{\w+\}")
# What an instance's scoped key may call, on its own instance id only.
_INSTANCE_ROUTE = "/api/v0/instances/{id}/"
_CONTAINER_SCOPE = frozenset((method, _INSTANCE_ROUTE) for method in ("GET", "PUT", "DELETE"))


@dataclass(frozen=True)
class Caller:
    """Whose key a request carries: the user's (`instance_id` None) or an instance's scoped
    CONTAINER_API_KEY."""

    instance_id: int | None = None

    @property
    def who(self) -> str:
        """The ledger's name for it: "user" or "container"."""
        return "user" if self.instance_id is None else "container"


USER = Caller()


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: tuple[str, ...]  # the path's {placeholders}, in order
    query: Mapping[str, str]
    body: Mapping[str, Any]
    base_url: str
    caller: Caller = USER


@dataclass(frozen=True)
class Reply:
    status: int
    payload: Any  # JSON-able, or str for text/plain, or bytes sent as they are as JSON
    headers: Mapping[str, str]
    garbled: bool = False  # the payload is a real answer cut short

    @classmethod
    def of(cls, status: int, payload: Any) -> Reply:
        return cls(status, payload, {})


Handler = Callable[[Request], Any]


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # e.g. "/api/v0/instances/{id}/", also the api_calls key
    handler: Handler

    def match(self, path: str) -> tuple[str, ...] | None:
        found = _compiled(self.template).fullmatch(path)
        return found.groups() if found else None


@functools.cache
def _compiled(template: str) -> re.Pattern[str]:
    return re.compile(_PLACEHOLDER.sub("([^/]+)", template))


def path_template(path: str) -> str:
    """An unrouted path's api_calls key: numeric segments become {id}."""
    return re.sub(r"/\d+(?=/)", "/{id}", path)


def _api_routes(market: Market, api_key: str) -> list[Route]:
    def user(_: Request) -> dict[str, Any]:
        return {**market.user(), "api_key": api_key}

    return [
        Route("POST", "/api/v0/bundles/", lambda r: market.search(r.body)),
        Route("PUT", "/api/v0/asks/{id}/", lambda r: market.create(r.params[0], r.body)),
        Route("POST", "/api/v0/asks/bulk/", lambda r: market.create_many(r.body)),
        Route("GET", "/api/v1/instances/", lambda r: market.list_v1(r.query)),
        Route("GET", "/api/v0/instances/", lambda r: market.list_v0()),
        Route("GET", "/api/v0/instances/{id}/", lambda r: market.show(r.params[0])),
        Route(
            "DELETE",
            _INSTANCE_ROUTE,
            lambda r: market.destroy(r.params[0], by=r.caller.who),
        ),
        Route("DELETE", "/api/v0/instances/", lambda r: market.destroy_many(r.body)),
        Route(
            "PUT",
            _INSTANCE_ROUTE,
            lambda r: market.manage(r.params[0], r.body, by=r.caller.who),
        ),
        Route("PUT", "/api/v0/instances/reboot/{id}/", lambda r: market.reboot(r.params[0])),
        Route(
            "PUT",
            "/api/v0/instances/bid_price/{id}/",
            lambda r: market.change_bid(r.params[0], r.body),
        ),
        Route("POST", "/api/v0/instances/{id}/ssh/", lambda r: market.attach(r.params[0], r.body)),
        Route(
            "PUT",
            "/api/v0/instances/request_logs/{id}/",
            lambda r: market.request_logs(r.params[0], r.body, r.base_url),
        ),
        Route("POST", "/api/v0/ssh/", lambda r: market.add_key(r.body)),
        Route("GET", "/api/v0/ssh/", lambda r: market.list_keys()),
        Route("DELETE", "/api/v0/ssh/{id}/", lambda r: market.delete_key(r.params[0])),
        Route("GET", "/api/v0/users/current/", user),
    ]


def _fake_routes(market: Market) -> list[Route]:
    def log(request: Request) -> Reply:
        text = market.fetch_log(request.params[0])
        return Reply.of(404, "NoSuchKey\n") if text is None else Reply.of(200, text)

    def limits(request: Request) -> dict[str, Any]:
        try:
            return market.limits.configure(request.body)
        except LimitsError as error:
            raise api_error(400, "invalid_limits", str(error)) from None

    return [
        Route("GET", "/_fake/ledger/", lambda r: market.ledger()),
        Route("GET", "/_fake/limits/", lambda r: market.limits.to_json()),
        Route("POST", "/_fake/limits/", limits),
        Route("GET", "/_fake/requests/", lambda r: market.requests()),
        Route("GET", "/_fake/faults/", lambda r: market.faults_json()),
        Route("POST", "/_fake/faults/", lambda r: market.set_faults(r.body)),
        Route("DELETE", "/_fake/faults/", lambda r: market.clear_faults()),
        Route("GET", "/_fake/logs/{name}/", log),
    ]


def _find(routes: list[Route], method: str, path: str) -> tuple[Route | None, tuple[str, ...]]:
    """The route for (method, path); a path known under another method gives a 405 route."""
    other_method = None
    for route in routes:
        params = route.match(path)
        if params is None:
            continue
        if route.method == method:
            return route, params
        other_method = route
    if other_method is not None:
        allowed = Route(method, other_method.template, _method_not_allowed)
        return allowed, ()
    return None, ()


def _method_not_allowed(request: Request) -> Reply:
    error = api_error(405, "method_not_allowed", f"{request.method} is not allowed here")
    return Reply.of(error.status, error.body)


@dataclass(frozen=True)
class _Incoming:
    """A received request and its route; the body is parsed only if a handler runs, so a
    401 or a fault answers before a malformed body would."""

    method: str
    path: str
    query: Mapping[str, str]
    raw_body: bytes
    base_url: str
    route: Route | None
    params: tuple[str, ...]

    @property
    def control(self) -> bool:
        return self.path.startswith("/_fake/")

    @property
    def template(self) -> str:
        """The api_calls key's path: the route's template, else numeric segments as {id}."""
        return self.route.template if self.route else path_template(self.path)

    def handle(self, caller: Caller = USER) -> Reply:
        if self.route is None:
            return Reply.of(
                404, {"success": False, "error": "not_found", "msg": f"{self.path} not found"}
            )
        try:
            body = _json_body(self.raw_body)
            request = Request(
                self.method, self.path, self.params, self.query, body, self.base_url, caller
            )
            result = self.route.handler(request)
        except ApiError as error:
            return Reply.of(error.status, error.body)
        return result if isinstance(result, Reply) else Reply.of(200, result)


class FakeVastServer(ThreadingHTTPServer):
    """Serves one Market on 127.0.0.1; each request runs on its own daemon thread."""

    daemon_threads = True

    def __init__(self, port: int, market: Market, api_key: str, log_requests: bool = False):
        self.market = market
        self.api_key = api_key
        self.log_requests = log_requests
        self.api_routes = _api_routes(market, api_key)
        self.fake_routes = _fake_routes(market)
        super().__init__(("127.0.0.1", port), _RequestHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def answer(self, handler: _RequestHandler, method: str) -> Reply:
        incoming = self._receive(handler, method)
        if incoming.control:
            return incoming.handle()
        call = self.market.log_call(method, incoming.template, incoming.path)
        reply = Reply.of(500, _FAKE_BUG)  # what _serve answers if the next line raises
        try:
            reply = self._api_answer(handler, incoming)
        finally:
            self.market.log_answer(call, reply.status, reply.garbled)
        return reply

    def _receive(self, handler: _RequestHandler, method: str) -> _Incoming:
        split = urlsplit(handler.path)
        path = normalise_path(split.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        routes = self.fake_routes if path.startswith("/_fake/") else self.api_routes
        route, params = _find(routes, method, path)
        host = handler.headers.get("Host") or f"127.0.0.1:{self.port}"
        return _Incoming(method, path, query, handler.read_body(), f"http://{host}", route, params)

    def _api_answer(self, handler: _RequestHandler, incoming: _Incoming) -> Reply:
        """Authentication and scope (401/403), the rate limits (429), then the first HTTP
        fault rule that fires, then the handler. A refused request uses up no fault rule."""
        caller, key = self._caller(handler, incoming.query)
        if caller is None:
            return Reply.of(401, _UNAUTHORIZED)
        refusal = _out_of_scope(caller, incoming)
        if refusal is not None:
            return Reply.of(refusal.status, refusal.body)
        method, template = incoming.method, incoming.template
        identity = Identity(key, handler.client_address[0])
        limited = self.market.limits.check(
            identity, f"{method} {template}", _ids_named(incoming.raw_body)
        )
        if limited is not None:
            return Reply(429, limited.payload, limited.headers)
        rule = self.market.faults.take_http(method, template, incoming.path)
        if rule is None:
            return incoming.handle(caller)
        time.sleep(rule.latency)
        if rule.garbled:
            return _cut_short(incoming.handle(caller))
        if rule.status is None:
            return incoming.handle(caller)
        if rule.after_effect:
            incoming.handle(caller)  # the request takes effect; only its answer is lost
        return Reply(rule.status, rule.error_body(method, template), rule.headers())

    def _caller(
        self, handler: _RequestHandler, query: Mapping[str, str]
    ) -> tuple[Caller | None, str]:
        """Whose key ``Authorization: Bearer <key>`` (all SDKs) or ``?api_key=`` (SDK <=
        1.5.0) carries: the user's, an instance's CONTAINER_API_KEY, or None (unknown); and
        that key, which the rate limits keep apart however it was sent."""
        header = handler.headers.get("Authorization", "")
        offered = [header.removeprefix("Bearer ").strip(), query.get("api_key", "")]
        offered = [key for key in offered if key]
        for key in offered:
            if hmac.compare_digest(key.encode(), self.api_key.encode()):
                return USER, key
        for key in offered:
            owner = self.market.container_key_owner(key)
            if owner is not None:
                return Caller(owner), key
        return None, ""


def _cut_short(reply: Reply) -> Reply:
    """The answer with its body ending halfway, as a dropped proxy connection or an
    overloaded server sends it: the status and headers stand, the JSON cannot be read."""
    whole = reply.payload if isinstance(reply.payload, str) else json.dumps(reply.payload)
    data = whole.encode()
    return Reply(reply.status, data[: max(1, len(data) // 2)], reply.headers, garbled=True)


def _out_of_scope(caller: Caller, incoming: _Incoming) -> ApiError | None:
    """The 403 for an instance's scoped key used beyond its own show/manage/destroy."""
    if caller.instance_id is None:
        return None
    own = f"instance {caller.instance_id}"
    template = incoming.route.template if incoming.route else None
    if (incoming.method, template) not in _CONTAINER_SCOPE:
        return forbidden(
            f"this API key is scoped to {own}: it may only show, stop/start or destroy it"
        )
    if incoming.params[0] != str(caller.instance_id):
        return forbidden(f"this API key is scoped to {own}, not instance {incoming.params[0]}")
    return None


def _ids_named(raw: bytes) -> int:
    """How many ids a batch request names (`ids` or `instance_ids`), at least 1: what the
    limits charge a batch whose rule counts per id. Other requests are charged 1 anyway."""
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return 1
    ids = body.get("ids", body.get("instance_ids")) if isinstance(body, dict) else None
    return len(ids) if isinstance(ids, list) and ids else 1


def _json_body(raw: bytes) -> Mapping[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise invalid_request("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid_request("request body must be a JSON object")
    return body


class _RequestHandler(BaseHTTPRequestHandler):
    server: FakeVastServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self, method: str) -> None:
        try:
            reply = self.server.answer(self, method)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            reply = Reply.of(500, _FAKE_BUG)
        if isinstance(reply.payload, bytes):
            data, content_type = reply.payload, JSON
        elif isinstance(reply.payload, str):
            data, content_type = reply.payload.encode(), "text/plain; charset=utf-8"
        else:
            data, content_type = json.dumps(reply.payload).encode(), JSON
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(reply.status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)
