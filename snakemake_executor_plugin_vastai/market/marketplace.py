"""The Vast.ai API, typed. Only this module talks HTTP (through the official ``vastai`` SDK).

Why a wrapper: the SDK returns loosely shaped dicts, retries only three times within half a
second, reports a failed create as a 200 with ``success: false``, and its exceptions carry
request URLs. Here every call is retried with backoff on rate limits and server errors,
answers become small dataclasses, and every message is scrubbed of secrets.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from snakemake_executor_plugin_vastai.base.errors import MarketError
from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.base.redact import MIN_SECRET_CHARS
from snakemake_executor_plugin_vastai.market.defaults import DEFAULT_API_URL
from snakemake_executor_plugin_vastai.market.keyfiles import key_file
from snakemake_executor_plugin_vastai.market.pacer import Pacer, Unpaced, book_path
from snakemake_executor_plugin_vastai.market.shares import Capacity, Needs

T = TypeVar("T")
log = get_logger(__name__)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# A rate limit that comes despite the pacer (another machine or tool on the same key) is
# waited out this long: more than search's 60 s window.
RATE_LIMIT_BUDGET_SECONDS = 90.0
UNPACED_ENV = "SNAKEMAKE_VASTAI_UNPACED"
DESTROY_BUDGET_SECONDS = 60.0  # sending and confirming one destroy, retries included
PAUSE_SLICE_SECONDS = 0.25  # a retry's wait looks this often whether to give up
# What the SDK raises on an unreadable answer (AttributeError: it calls dict methods on it).
GARBLED = (ValueError, KeyError, TypeError, AttributeError)
LIST_PAGE_SIZE = 25  # the most instances one list call returns (vast-api.md, "List instances")
WRONG_SHAPE = "not the shape the Vast.ai API sends"
FATAL_BOOT_MESSAGES = (
    "oci runtime create failed",
    "toomanyrequests",
    "manifest unknown",
    "unauthorized: authentication required",
    "no space left on device",
    "error response from daemon",
)
# Of those, the ones every machine would meet: the image itself is wrong (a misspelt name or
# tag, a private image without credentials). The others are the machine's (its disk, its
# pulls, its daemon), and another machine may well boot.
IMAGE_FAULT_MESSAGES = (
    "manifest unknown",
    "unauthorized: authentication required",
    "pull access denied",
    "repository does not exist",
    "invalid reference format",
)
# Runtype that starts sshd in the container and wires both the direct port and Vast's proxy.
SSH_RUNTYPE = "ssh_direc ssh_proxy"


def image_fault(message: str) -> bool:
    """Whether a boot error is the image's, so that no machine would boot it."""
    text = message.lower()
    return any(pattern in text for pattern in IMAGE_FAULT_MESSAGES)


class MarketplaceError(MarketError):
    """A Vast.ai API call failed for good; the message is safe to print. ``status`` is the
    last HTTP status, 0 when the API could not be reached at all."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class AuthError(MarketplaceError):
    """The API key is missing or was rejected."""


class OfferGone(MarketplaceError):
    """The offer was taken or withdrawn between search and create; try the next one."""


class CreateOutcomeUnknown(MarketplaceError):
    """The create request may have taken effect but its answer was lost (a server error or
    a broken connection): only the instance list, by label, can tell."""


class Abandoned(MarketplaceError):
    """A call refused before any effect (a rate limit, or no answer to a call that is safe to
    repeat) that the caller asked to stop retrying: the run is closing, or a deadline passed."""


class QuotaExhausted(MarketplaceError):
    """Vast.ai's daily search quota for this key is used up: retrying only burns requests."""

    def __init__(self, reset: str) -> None:
        super().__init__(
            "Vast.ai's daily offer-search quota for this API key is used up "
            f"(it resets {reset}). No new instance can be rented until then; jobs already "
            "running finish. Rerun after the reset.",
            429,
        )


class ApiUnreachable(MarketplaceError):
    """No answer at all (connection refused, unknown host, timeout): a matter of the network
    or the URL, never of the key. ``what``: the call; ``hint``: the fix, when known."""

    def __init__(self, url: str, reason: str, what: str = "", hint: str = "") -> None:
        doing = f" ({what})" if what else ""
        super().__init__(_join(f"Cannot reach the Vast.ai API at {url}{doing}: {reason}.", hint))
        self.url = url
        self.reason = reason


class GarbledAnswer(MarketplaceError):
    """An answer the Vast.ai API would not send (not JSON, or the wrong shape): a proxy or
    server fault, or a URL that points at some other server."""

    def __init__(self, url: str, reason: str, what: str = "", hint: str = "") -> None:
        doing = f" ({what})" if what else ""
        text = f"The Vast.ai API at {url} sent an answer that cannot be read{doing}: {reason}."
        super().__init__(_join(text, hint))
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class Offer:
    id: int
    gpu_name: str
    num_gpus: int
    dph_total: float
    cpu_cores: float  # the instance's share of the machine's cores
    cpu_ram_mb: int  # the instance's share of the machine's RAM (see machine_share)
    disk_gb: float
    geolocation: str
    reliability: float
    machine_id: int
    min_bid: float = 0.0  # the lowest bid ($/h, disk excluded) an interruptible rent takes
    storage_dph: float = 0.0  # what the rented disk adds per hour, bid or not
    on_demand_dph: float = 0.0  # the same machine on demand, disk included
    interruptible: bool = False  # found by a bid search: dph_total is min_bid + storage_dph
    bid_price: float | None = None  # set by with_bid: the price to rent at
    inet_up_cost: float = 0.0  # $/GB the host sends (our downloads), billed per byte
    inet_down_cost: float = 0.0  # $/GB the host receives (our uploads)

    @classmethod
    def from_api(cls, row: dict[str, Any], interruptible: bool = False) -> Offer:
        dph_total = float(row.get("dph_total") or 0.0)
        min_bid = float(row.get("min_bid") or 0.0)
        dph_base = float(row.get("dph_base") or 0.0)
        storage = max(0.0, dph_total - (min_bid if interruptible else dph_base))
        return cls(
            id=int(row["id"]),
            gpu_name=str(row.get("gpu_name", "")),
            num_gpus=int(row.get("num_gpus") or 0),
            dph_total=dph_total,
            cpu_cores=float(row.get("cpu_cores_effective") or row.get("cpu_cores") or 0.0),
            cpu_ram_mb=int(float(row.get("cpu_ram") or 0) * machine_share(row)),
            disk_gb=float(row.get("disk_space") or 0.0),
            geolocation=str(row.get("geolocation") or ""),
            reliability=float(row.get("reliability2") or row.get("reliability") or 0.0),
            machine_id=int(row.get("machine_id") or 0),
            min_bid=min_bid,
            storage_dph=storage,
            on_demand_dph=(dph_base + storage) if dph_base else dph_total,
            interruptible=interruptible,
            inet_up_cost=float(row.get("inet_up_cost") or 0.0),
            inet_down_cost=float(row.get("inet_down_cost") or 0.0),
        )

    def capacity(self, disk_gb: float) -> Capacity:
        """What an instance on this offer has for its jobs, with the disk a rent asks for."""
        return Capacity(
            gpus=self.num_gpus,
            cores=self.cpu_cores,
            mem_gb=self.cpu_ram_mb / 1000,
            disk_gb=float(disk_gb),
        )

    def holds(self, needs: Needs, disk_gb: float) -> bool:
        """Could an instance on this offer ever run a job with these needs? A search filters
        on the whole machine (``cpu_ram``), an instance gets only its share."""
        return self.capacity(disk_gb).holds(needs)

    def with_bid(self, factor: float, max_price: float | None) -> Offer | None:
        """This offer priced as a bid of min_bid x factor, lowered to stay within max_price
        (which counts the disk); None when even the minimum bid would pass max_price."""
        price = self.min_bid * factor
        if max_price is not None:
            price = min(price, max_price - self.storage_dph)
        if price < self.min_bid or price <= 0:
            return None
        price = round(price, 4)
        return replace(self, bid_price=price, dph_total=round(price + self.storage_dph, 6))

    def describe(self) -> str:
        kind = f", bid ${self.bid_price:.3f}/h" if self.bid_price is not None else ""
        return (
            f"offer {self.id}{kind}: {self.num_gpus}x {self.gpu_name}, {self.cpu_cores:g} cores, "
            f"{self.cpu_ram_mb / 1000:g} GB RAM, {self.geolocation or 'unknown location'}, "
            f"reliability {self.reliability:.1%}, ${self.dph_total:.3f}/h"
        )


@dataclass(frozen=True)
class InstanceInfo:
    """One row of the instance list: what the plugin needs to track and reach an instance."""

    id: int
    label: str
    actual_status: str | None
    intended_status: str | None
    status_msg: str
    ssh_host: str | None
    ssh_port: int | None
    public_ipaddr: str | None
    direct_ssh_port: int | None
    dph_total: float
    start_date: float

    @classmethod
    def from_api(cls, row: dict[str, Any]) -> InstanceInfo:
        ports = row.get("ports") or {}
        direct = (ports.get("22/tcp") or [{}])[0].get("HostPort")
        return cls(
            id=int(row["id"]),
            label=str(row.get("label") or ""),
            actual_status=row.get("actual_status"),
            intended_status=row.get("intended_status"),
            status_msg=str(row.get("status_msg") or ""),
            ssh_host=row.get("ssh_host") or None,
            ssh_port=int(row["ssh_port"]) if row.get("ssh_port") else None,
            public_ipaddr=row.get("public_ipaddr") or None,
            direct_ssh_port=int(direct) if direct else None,
            dph_total=float(row.get("dph_total") or 0.0),
            start_date=float(row.get("start_date") or 0.0),
        )

    @property
    def fatal_boot_message(self) -> str | None:
        """The Docker error that will never heal by waiting, if the status message holds one."""
        text = self.status_msg.lower()
        if any(pattern in text for pattern in FATAL_BOOT_MESSAGES):
            return self.status_msg
        return None

    @property
    def lost(self) -> bool:
        """The host stopped or vanished: the instance will not come back to ``running``. A
        stopped instance asked to run again (intended ``running``) is not lost: it waits for
        its GPU, which its start timeout bounds."""
        restarting = self.actual_status == "stopped" and self.intended_status == "running"
        return (
            self.actual_status in {"offline", "unknown", "stopped", "exited"} and not restarting
        ) or self.intended_status == "stopped"


@dataclass(frozen=True)
class ApiOptions:
    """How the program the user ran spells its key and URL options, so that a message names
    a flag the user can actually pass, and what a failed check means for their work."""

    key_flag: str
    url_flag: str
    outcome: str = ""  # appended to every failure message of the key and URL checks

    def fix_url(self) -> str:
        return f"{self.url_flag} / VAST_URL"


PLUGIN_OPTIONS = ApiOptions("--vastai-api-key", "--vastai-api-url", "Nothing was rented.")
HELPER_OPTIONS = ApiOptions("--api-key", "--api-url")
# Below the command-line flag, in the order they count. The SNAKEMAKE_ names are the ones
# Snakemake derives for the plugin's env_var settings; the helper reads them too.
KEY_VARIABLES = ("SNAKEMAKE_VASTAI_API_KEY", "VAST_API_KEY")
URL_VARIABLES = ("SNAKEMAKE_VASTAI_API_URL", "VAST_URL")


def _join(*parts: str) -> str:
    return " ".join(part for part in parts if part)


def key_files() -> tuple[Path, Path]:
    """Where the vastai CLI keeps the key (``vastai set api-key``), newest convention first."""
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "vastai" / "vast_api_key", Path.home() / ".vast_api_key"


def _stored_keys() -> Iterator[tuple[str, str]]:
    """(origin, key) of every key source below the flag, in order; read lazily."""
    for name in KEY_VARIABLES:
        yield name, os.environ.get(name, "").strip()
    for path in key_files():
        yield f"the key file {path}", path.read_text().strip() if path.is_file() else ""


def resolve_api_key(explicit: str | None, options: ApiOptions = PLUGIN_OPTIONS) -> str:
    """The key from the flag, SNAKEMAKE_VASTAI_API_KEY, VAST_API_KEY or the vastai CLI's key
    files, in that order: the plugin and the helper read the same sources."""
    if explicit and explicit.strip():
        return explicit.strip()
    for _, key in _stored_keys():
        if key:
            return key
    raise AuthError(
        _join(
            f"No Vast.ai API key found. Pass {options.key_flag}, or set "
            f"{' or '.join(KEY_VARIABLES)}, or run 'vastai set api-key <key>'.",
            options.outcome,
        )
    )


def key_origin(key: str, options: ApiOptions = PLUGIN_OPTIONS) -> str:
    """Where ``key`` came from, for messages (never the key itself). Found by value because
    the plugin gets its key from Snakemake, which has already merged the flag with
    SNAKEMAKE_VASTAI_API_KEY: the first stored source holding it, else the flag."""
    return next((origin for origin, held in _stored_keys() if held == key), options.key_flag)


def resolve_api_url(explicit: str | None, options: ApiOptions = PLUGIN_OPTIONS) -> str:
    """The flag, SNAKEMAKE_VASTAI_API_URL, the SDK's own VAST_URL, then Vast.ai itself."""
    stored = (os.environ.get(name, "").strip() for name in URL_VARIABLES)
    url = next((u for u in (explicit or "", *stored) if u.strip()), DEFAULT_API_URL).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MarketplaceError(
            _join(
                f"The Vast.ai API URL {url!r} is not an http:// or https:// URL with a host. "
                f"Check {options.fix_url()}.",
                options.outcome,
            )
        )
    return url.rstrip("/")


def parse_offer_query(query: str) -> dict[str, dict[str, Any]]:
    """Parse ``query`` exactly as the SDK's search_offers does (without its default
    filters), so what fails here would fail there. Fields the SDK does not know raise too:
    the SDK only warns about them on stderr and sends them anyway, so a misspelt filter
    would go unnoticed. Raises ValueError."""
    from vastai.api.query import offers_alias, offers_fields, offers_mult, parse_query

    try:
        parsed = parse_query(query, {}, offers_fields, offers_alias, offers_mult)
    except TypeError as e:  # e.g. a list for a field the SDK multiplies (cpu_ram in [...])
        raise ValueError(str(e)) from None
    unknown = sorted(set(parsed) - offers_fields)
    if unknown:
        raise ValueError(f"unknown offer field(s) {', '.join(unknown)}")
    return parsed


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    first_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0

    def delays(self) -> Iterable[float]:
        delay = self.first_delay
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * self.factor, self.max_delay)


class Marketplace:
    """Typed, retrying, secret-scrubbing access to the Vast.ai API for one run."""

    def __init__(
        self,
        api_key: str,
        api_url: str,
        retry: RetryPolicy | None = None,
        paced: bool = False,
    ) -> None:
        """``paced``: keep to Vast.ai's rate limits (a run and the helper command do, see
        ``pacing_wanted``)."""
        from vastai import VastAI  # the SDK is heavy; import only when a run really starts

        self._secrets = [api_key]
        self.api_url = api_url
        self.paced = paced
        self._retry = retry or RetryPolicy()
        self._pacer = Pacer(book_path(api_url, api_key)) if paced else None
        self._quota_reset = 0.0  # until when the daily search quota is known to be used up
        # retry=1: the SDK's own retry loop would hide the status codes our policy needs.
        self._sdk = VastAI(api_key=api_key, server_url=api_url, retry=1, raw=True, quiet=True)

    def key_file(self, kind: str) -> Path:
        """A file every process of this key and URL on this machine shares (``keyfiles``)."""
        return key_file(self.api_url, self._secrets[0], kind)

    def add_secret(self, value: str) -> None:
        """Scrub this value too from every message (e.g. forwarded credentials)."""
        if len(value) >= MIN_SECRET_CHARS:
            self._secrets.append(value)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    # -- calls ---------------------------------------------------------------------------

    def check_credentials(self, options: ApiOptions = PLUGIN_OPTIONS) -> None:
        """Stop at start, before anything is rented, with one message naming the one thing to
        fix: the network, the URL, or the key (and where that key came from). A refused
        connection fails at once: nothing listens at that URL's host and port, which is a
        wrong URL far more often than a server that will be back in a few seconds."""
        url = self.redact(self.api_url)
        wrong_url = _join(f"Is {url} the Vast.ai API? Check {options.fix_url()}.", options.outcome)
        try:
            user = self._call(
                "check the API key", self._sdk.show_user, endpoint="user", retry_refused=False
            )
        except ApiUnreachable as error:
            network = f"Check the network, or {options.fix_url()}."
            raise ApiUnreachable(url, error.reason, hint=_join(network, options.outcome)) from None
        except GarbledAnswer as error:
            raise GarbledAnswer(url, error.reason, hint=wrong_url) from None
        except MarketplaceError as error:
            if isinstance(error, AuthError) or error.status == 403:
                origin = key_origin(self._secrets[0], options)
                fix = f"Check that key, or pass another with {options.key_flag}."
                raise AuthError(
                    _join(
                        f"Vast.ai rejected the API key from {origin} (HTTP {error.status}).",
                        fix,
                        options.outcome,
                    ),
                    error.status,
                ) from None
            if error.status in (404, 405):  # no user endpoint there: not the Vast.ai API
                reason = f"HTTP {error.status} for the user account"
                raise GarbledAnswer(url, reason, hint=wrong_url) from None
            raise MarketplaceError(_join(str(error), options.outcome), error.status) from None
        if not isinstance(user, dict):
            raise GarbledAnswer(url, WRONG_SHAPE, hint=wrong_url)

    def search(
        self,
        query: str,
        order: str,
        disk_gb: float,
        limit: int = 20,
        interruptible: bool = False,
    ) -> list[Offer]:
        """Offers, cheapest first by ``order``; ``interruptible``: priced as bids."""
        kind = "bid" if interruptible else "on-demand"
        rows = self._call(
            "search offers",
            lambda: self._sdk.search_offers(
                query=query, type=kind, order=order, limit=limit, storage=disk_gb
            ),
            endpoint="search",
        )
        return [Offer.from_api(row, interruptible) for row in rows]

    def rent(
        self,
        offer_id: int,
        *,
        image: str,
        disk_gb: float,
        label: str,
        onstart: str,
        price: float | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> int:
        """Create an instance; returns its id (``price``: a bid, making it interruptible).
        ``OfferGone`` means: try the next offer.

        A create is not idempotent, so it is never blindly retried: after a transport or
        server error it raises ``CreateOutcomeUnknown`` and the unique label tells, later,
        whether the instance exists after all. A rate limit (429) is refused before any
        effect, so that one is retried here, until ``give_up`` says so (``Abandoned``:
        nothing was created).
        """

        def create() -> dict[str, Any]:
            return self._sdk.create_instance(
                id=offer_id,
                image=image,
                disk=disk_gb,
                label=label,
                onstart_cmd=onstart,
                runtype=SSH_RUNTYPE,
                cancel_unavail=True,
                price=price,
            )

        try:
            answer = self._call(
                "rent", create, endpoint="create", retry_server_errors=False, give_up=give_up
            )
        except (OfferGone, Abandoned):  # Abandoned: never sent, so nothing to look for
            raise
        except MarketplaceError as error:
            if error.status == 0 or error.status >= 500:
                raise CreateOutcomeUnknown(str(error), error.status) from None
            raise
        if not isinstance(answer, dict):
            raise CreateOutcomeUnknown(f"rent offer {offer_id}: unreadable answer")
        if not answer.get("success") or not answer.get("new_contract"):
            raise OfferGone(self.redact(f"offer {offer_id} refused: {answer.get('msg', answer)}"))
        return int(answer["new_contract"])

    def attach_key(self, instance_id: int, public_key: str) -> None:
        self._call(
            f"attach the SSH key to instance {instance_id}",
            lambda: self._sdk.attach_ssh(instance_id, public_key),
            endpoint="manage",
        )

    def find_by_label(self, label: str) -> InstanceInfo | None:
        for row in self.list_instances():
            if row.label == label:
                return row
        return None

    def list_instances(self) -> list[InstanceInfo]:
        """Every instance of the account, once per status round. The list comes in pages of
        LIST_PAGE_SIZE, and each page is a call under the list limit: an account with more
        instances than a page would otherwise be refused on every later page."""
        from vastai.api.instances import show_instances_v1

        params: dict[str, Any] = {
            "select_filters": {},
            "order_by": [{"col": "id", "dir": "asc"}],
            "limit": LIST_PAGE_SIZE,
        }

        def one_page() -> tuple[list[InstanceInfo], str | None]:
            answer = show_instances_v1(self._sdk.client, params)
            rows = [InstanceInfo.from_api(row) for row in answer["instances"] or []]
            return rows, answer.get("next_token") or None

        found: list[InstanceInfo] = []
        for page in itertools.count(1):
            rows, next_token = self._call(
                f"list instances (page {page})", one_page, endpoint="list"
            )
            found.extend(rows)
            if next_token is None:
                return found
            params["after_token"] = next_token

    def show(
        self, instance_id: int, give_up: Callable[[], bool] | None = None
    ) -> InstanceInfo | None:
        """One instance, or None once it is gone."""
        row = self._call(
            f"show instance {instance_id}",
            lambda: self._sdk.show_instance(instance_id),
            endpoint="show",
            give_up=give_up,
        )
        return InstanceInfo.from_api(row) if row else None

    def log_tail(self, instance_id: int, lines: int = 30, budget: float = 10.0) -> str:
        """The last lines of an instance's log (secrets redacted), or "" when Vast has none
        ready within ``budget`` seconds. Two steps: the API names a URL, where the log
        appears after a moment (fetched without credentials, as the SDK does)."""
        import requests

        deadline = time.monotonic() + budget
        answer = self._call(
            f"request the log of instance {instance_id}",
            lambda: self._direct(
                "PUT", f"/api/v0/instances/request_logs/{instance_id}/", {"tail": str(lines)}
            ),
            endpoint="manage",
        )
        url = answer.get("result_url") if isinstance(answer, dict) else None
        while url and time.monotonic() < deadline:
            try:
                response = requests.get(url, timeout=max(1.0, deadline - time.monotonic()))
            except requests.RequestException:
                response = None
            if response is not None and response.status_code == 200:
                tail = response.text.strip().splitlines()[-lines:]
                return self.redact("\n".join(tail))
            time.sleep(0.3)
        return ""

    def _direct(self, method: str, path: str, body: dict[str, Any]) -> Any:
        """A request the SDK has no safe call for in every supported version: the log
        request (its logs() polls for 9 s and may return a dict) and the batch destroy."""
        import requests

        response = requests.request(
            method,
            self.api_url.rstrip("/") + path,
            json=body,
            headers={"Authorization": f"Bearer {self._secrets[0]}"},
            timeout=30,
        )
        response.raise_for_status()
        return response.json()

    def relabel(self, instance_id: int, label: str) -> None:
        """Give the instance a new label (a later run that adopted it names itself)."""
        self._call(
            f"relabel instance {instance_id}",
            lambda: self._sdk.label_instance(instance_id, label),
            endpoint="manage",
        )

    def stop(self, instance_id: int) -> None:
        """Stop the instance: its GPU goes back to the market, its disk stays (and bills)."""
        self._call(
            f"stop instance {instance_id}",
            lambda: self._sdk.stop_instance(instance_id),
            endpoint="manage",
        )

    def start(self, instance_id: int) -> None:
        """Start a stopped instance again: it waits for its machine's GPU, then boots from
        its disk (no image pull)."""
        self._call(
            f"start instance {instance_id}",
            lambda: self._sdk.start_instance(instance_id),
            endpoint="manage",
        )

    def reboot(self, instance_id: int) -> None:
        """Restart the instance's container (keeps its disk and its place on the host)."""
        self._call(
            f"reboot instance {instance_id}",
            lambda: self._sdk.reboot_instance(instance_id),
            endpoint="manage",
        )

    def request_destroy(self, instance_id: int, give_up: Callable[[], bool] | None = None) -> float:
        """Send the destroy (retried on rate limits and server errors); gone is fine. Returns
        when the answered attempt was sent, where Vast.ai's bill ends."""
        return self._sent_at(
            f"destroy instance {instance_id}",
            lambda: self._sdk.destroy_instance(instance_id),
            endpoint="destroy",
            gone_is_ok=True,
            give_up=give_up,
        )

    def request_destroy_many(
        self, instance_ids: list[int], give_up: Callable[[], bool] | None = None
    ) -> float:
        """One batch destroy for several instances (``DELETE /instances/``, vastai SDK 1.9's
        ``destroy_instances``): one call against the destroy limit instead of one each.
        Returns when the answered attempt was sent."""
        return self._sent_at(
            f"destroy instances {', '.join(map(str, instance_ids))}",
            lambda: self._direct("DELETE", "/api/v0/instances/", {"instance_ids": instance_ids}),
            endpoint="destroy",
            weight=len(instance_ids),
            give_up=give_up,
        )

    def _sent_at(self, what: str, fn: Callable[[], Any], **options: Any) -> float:
        """``_call``, returning when its last attempt left, after the pacer's wait: the
        marketplace acts on a request when it arrives, and may answer only later."""
        sent = 0.0

        def send() -> Any:
            nonlocal sent
            sent = time.time()
            return fn()

        self._call(what, send, **options)
        return sent

    def destroy(self, instance_id: int, budget: float = DESTROY_BUDGET_SECONDS) -> float:
        """Destroy and confirm the instance is gone; an already-gone instance is fine. Every
        retry stops within ``budget`` seconds: past it, MarketplaceError says it may bill.
        Returns when the first answered destroy was sent: the bill ends there, not when a
        later show confirms it (the confirmation's time if no destroy was answered)."""
        deadline = time.monotonic() + budget
        ended: float | None = None

        def late() -> bool:
            return time.monotonic() > deadline

        while True:
            try:
                sent = self.request_destroy(instance_id, give_up=late)
                ended = ended or sent
            except MarketplaceError:
                if late():
                    raise
            try:
                if self.show(instance_id, give_up=late) is None:
                    return ended or time.time()
            except MarketplaceError:
                if late():
                    raise
            if late():
                raise MarketplaceError(
                    f"instance {instance_id} is still listed {budget:.0f} s after "
                    "destroy; check the Vast.ai console, it may still be billing"
                )
            time.sleep(1.0)

    # -- plumbing ------------------------------------------------------------------------

    def _call(
        self,
        what: str,
        fn: Callable[[], T],
        *,
        endpoint: str,
        weight: int = 1,
        retry_server_errors: bool = True,
        gone_is_ok: bool = False,
        give_up: Callable[[], bool] | None = None,
        retry_refused: bool = True,
    ) -> T:
        """One API call, made when the pacer gives ``endpoint`` its turn, retried as its
        kind allows. A rate limit that comes anyway is waited out, not counted as a failure,
        for up to RATE_LIMIT_BUDGET_SECONDS. ``give_up``: asked while waiting; True ends the
        call with ``Abandoned`` (nothing was done). ``retry_refused``: False makes a refused
        connection final (mid-run, a server that restarts is retried)."""
        import requests

        if endpoint == "search" and time.time() < self._quota_reset:
            raise QuotaExhausted(_in_words(self._quota_reset))  # asking again only burns it
        delays = iter(self._retry.delays())
        limited_since: float | None = None
        while True:
            self._take_turn(endpoint, what, give_up, weight)
            try:
                return fn()
            except requests.HTTPError as error:
                response = error.response
                status = response.status_code if response is not None else 0
                body = _json_body(response)
                if status == 401 or body.get("error") == "auth_error":
                    raise AuthError(
                        f"Vast.ai rejected the API key ({what}: HTTP {status}). Nothing was "
                        "rented by this call.",
                        status,
                    ) from None
                if gone_is_ok and status == 404:
                    return None  # type: ignore[return-value]
                if status in (404, 410) and body.get("error") in ("no_such_ask", "invalid_args"):
                    raise OfferGone(
                        self.redact(f"{what}: {body.get('msg', status)}"), status
                    ) from None
                if body.get("error") == "search_quota_exceeded":
                    self._quota_reset = _quota_reset(response)
                    raise QuotaExhausted(_in_words(self._quota_reset)) from None
                if status == 429 and self._pacer is not None:
                    limited_since = limited_since or time.monotonic()
                    if time.monotonic() - limited_since > RATE_LIMIT_BUDGET_SECONDS:
                        raise MarketplaceError(
                            f"Vast.ai API: could not {what}: still refused as too frequent "
                            f"(HTTP 429) after {RATE_LIMIT_BUDGET_SECONDS:.0f} s; another "
                            "program may be using this API key at the same time",
                            status,
                        ) from None
                    log.debug("Vast.ai API %s: HTTP 429; waiting for the next turn", what)
                    self._pacer.refused(endpoint)
                    continue
                retryable = status == 429 or (retry_server_errors and status in RETRYABLE_STATUS)
                wait = next(delays, None) if retryable else None
                if wait is None:
                    detail = body.get("msg") or body.get("error") or body.get("detail") or ""
                    raise MarketplaceError(
                        self.redact(f"Vast.ai API: could not {what}: HTTP {status} {detail}"),
                        status,
                    ) from None
                wait = max(wait, _retry_after(response))
                log.debug("Vast.ai API %s: HTTP %s, retrying in %.1f s", what, status, wait)
                self._pause(wait, what, status, give_up)
            except (requests.RequestException, *GARBLED) as error:
                # No answer, or a garbled one (not JSON, or not the shape the SDK indexes,
                # as a proxy or a server fault sends): retried like a server error. A request
                # that could not even be sent (a malformed URL) is not retried.
                final = _unsent(error) or (not retry_refused and _refused(error))
                wait = next(delays, None) if retry_server_errors and not final else None
                if wait is None:
                    raise self._no_answer(error, what) from None
                self._pause(wait, what, 0, give_up)

    def _take_turn(
        self, endpoint: str, what: str, give_up: Callable[[], bool] | None, weight: int
    ) -> None:
        if self._pacer is None:
            return
        try:
            waited = self._pacer.wait_turn(endpoint, give_up, weight)
        except Unpaced:
            raise Abandoned(f"Vast.ai API: stopped waiting to {what} (rate limit)") from None
        if waited > 1.0:
            log.debug("Vast.ai API %s: waited %.1f s for the rate limit", what, waited)

    def _pause(
        self, seconds: float, what: str, status: int, give_up: Callable[[], bool] | None
    ) -> None:
        """The wait before a retry, cut short (``Abandoned``) as soon as ``give_up`` says so."""
        deadline = time.monotonic() + seconds
        while True:
            if give_up is not None and give_up():
                raise Abandoned(f"Vast.ai API: stopped retrying to {what} (HTTP {status})", status)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, PAUSE_SLICE_SECONDS))

    def _no_answer(self, error: Exception, what: str) -> MarketplaceError:
        """The error for a call that got no usable answer: none at all, or a garbled one."""
        url = self.redact(self.api_url)
        if isinstance(error, GARBLED) and not _unsent(error):
            return GarbledAnswer(url, self.redact(_garble_reason(error)), what)
        return ApiUnreachable(url, self.redact(_network_reason(error)), what)


def _json_body(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except Exception:
        return {}
    return body if isinstance(body, dict) else {}


def machine_share(row: dict[str, Any]) -> float:
    """An instance's share of its machine: Vast.ai gives an instance RAM and CPU in
    proportion to the GPUs it rents (vast-api.md section 10). ``cpu_cores_effective`` is
    already the share of ``cpu_cores`` (dstack's gpuhunt derives memory so), else
    ``gpu_frac``; the whole machine when the offer says neither."""
    try:
        cores = float(row.get("cpu_cores") or 0)
        effective = float(row.get("cpu_cores_effective") or 0)
        fraction = float(row.get("gpu_frac") or 0)
    except (TypeError, ValueError):
        return 1.0
    if cores > 0 and effective > 0:
        return min(1.0, effective / cores)
    return min(1.0, fraction) if fraction > 0 else 1.0


def helper_market(api_key: str | None, api_url: str | None) -> Marketplace:
    """The API as the helper command (``snakemake-vastai``) reaches it: the plugin's key and
    URL sources under the helper's flags, checked first, so that a wrong key or URL is named
    as such and not as a failure of whatever came next."""
    api = Marketplace(
        resolve_api_key(api_key, HELPER_OPTIONS),
        resolve_api_url(api_url, HELPER_OPTIONS),
        paced=pacing_wanted(),
    )
    api.check_credentials(HELPER_OPTIONS)
    return api


def pacing_wanted() -> bool:
    """Keep to Vast.ai's rate limits, unless UNPACED_ENV is set: for a marketplace without
    them (the bundled fake with its limits off, in tests about something else)."""
    return not os.environ.get(UNPACED_ENV)


def _quota_reset(response: Any) -> float:
    """When a quota resets (epoch seconds): X-RateLimit-Reset, else the next UTC midnight
    (when Vast.ai resets it)."""
    try:
        return float(response.headers.get("X-RateLimit-Reset"))
    except (AttributeError, TypeError, ValueError):
        return (time.time() // 86400 + 1) * 86400


def _in_words(reset: float) -> str:
    return "at " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(reset))


def _retry_after(response: Any) -> float:
    try:
        return min(float(response.headers.get("Retry-After", 0)), 60.0)
    except (TypeError, ValueError):
        return 0.0


def _unsent(error: BaseException) -> bool:
    """A request that could not be sent at all (requests' own ValueErrors for a bad URL),
    as opposed to one that got no answer or a garbled one."""
    import requests

    transient = (requests.ConnectionError, requests.Timeout, requests.JSONDecodeError)
    return isinstance(error, requests.RequestException) and not isinstance(error, transient)


def _refused(error: BaseException) -> bool:
    """Whether nothing listened at the host and port (the socket's own ECONNREFUSED)."""
    return any(isinstance(cause, ConnectionRefusedError) for cause in _causes(error))


def _network_reason(error: BaseException) -> str:
    """Why no connection came about, in the words of its root cause ("connection refused",
    "host name not found (...)", "timed out"): each has another fix."""
    import requests

    if isinstance(error, requests.Timeout):
        return "timed out"
    for cause in _causes(error):
        if isinstance(cause, socket.gaierror):
            return f"host name not found ({cause.strerror})"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[0].lower() + cause.strerror[1:]
    return str(error) or type(error).__name__


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and all it wraps, outermost first: requests and urllib3 nest the socket's
    own error in ``args``, ``reason`` and ``__cause__``."""
    queue, seen = [error], set()
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [*current.args, getattr(current, "reason", None), current.__cause__]
        queue += [w for w in wrapped if isinstance(w, BaseException)]


def _garble_reason(error: BaseException) -> str:
    """What was wrong with an answer, briefly: not JSON, a part missing, or another shape."""
    if isinstance(error, json.JSONDecodeError):
        return "not JSON"
    if isinstance(error, KeyError):
        return f"no {error.args[0]!r} in it"
    return WRONG_SHAPE
