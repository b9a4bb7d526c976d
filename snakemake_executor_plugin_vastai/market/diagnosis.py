"""Why no offer matches a job, and which single change would find one.

Why: "no offer matches" alone leaves the user guessing which of ten filters to loosen, and
some of them (reliability, datacenter-only, disk) are defaults they never set. Here each
filter the request has is relaxed alone and searched once, and the message names the one or
two changes that find offers, with a concrete value and the price they give. A GPU model
no offer lists gets a did-you-mean from the models the marketplace does list.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

from snakemake_executor_plugin_vastai.market.defaults import DEFAULT_DISK_GB, DEFAULT_RELIABILITY
from snakemake_executor_plugin_vastai.market.marketplace import Marketplace, MarketplaceError, Offer
from snakemake_executor_plugin_vastai.market.regions import REGIONS
from snakemake_executor_plugin_vastai.market.request import MIN_DISK_GB, ResourceRequest

RELAXED_LIMIT = 100  # offers per relaxed search: enough to count them and pick a value
NAMES_LIMIT = 500  # offers of the one search that lists the GPU models on the market
MAX_HINTS = 2
# Which hints come first: the GPU model the user probably meant (alone, it is all they
# need), then a default the user never chose, then any other change; each by price.
MEANT, DEFAULT, OTHER = range(3)
DIAGNOSIS_ORDER = "dph_total"  # the hints quote the cheapest price, whatever --vastai-order

DEFAULTS = {"disk": DEFAULT_DISK_GB, "reliability": DEFAULT_RELIABILITY}


class ChosenOptions(Protocol):
    """The run's options a diagnosis reads (the plugin's settings are one), to tell an
    option from a job's resource."""

    gpu_name: str | None
    disk: int
    search_query: str | None
    geolocation: str | None


Search = Callable[[ResourceRequest, int], list[Offer]]
"""Offers for a request, cheapest first, at most ``limit`` of them."""


def market_search(market: Marketplace, clause: str = "") -> Search:
    """A Search on ``market``; ``clause`` is appended to every query (the run's excluded
    hosts), so a near miss is only reported where the run would really rent. The market
    filters ``cpu_ram`` on the whole machine; an offer whose share of the RAM is less than
    the request asks is left out here, as the run would leave it. Each distinct search is
    made once per Search: diagnoses of several rules share the market's answers (Vast.ai
    allows ten searches a minute)."""
    answers: dict[tuple[str, int, float, bool], list[Offer]] = {}

    def search(request: ResourceRequest, limit: int) -> list[Offer]:
        query = " ".join(filter(None, (request.offer_query(), clause)))
        key = (query, limit, request.disk_gb, request.interruptible)
        if key not in answers:
            answers[key] = market.search(
                query,
                DIAGNOSIS_ORDER,
                request.disk_gb,
                limit=limit,
                interruptible=request.interruptible,
            )
        wanted_mb = (request.mem_gb or 0) * 1000
        return [offer for offer in answers[key] if offer.cpu_ram_mb >= wanted_mb]

    return search


@dataclass(frozen=True)
class Hint:
    """One change that finds offers: what to change, and what the market then offers."""

    change: str  # e.g. "With `--vastai-reliability 0.97` (now 0.98, the default)"
    offers: int
    at_least: bool  # the search stopped at its limit, so there are maybe more
    cheapest: float  # $/h
    note: str = ""  # e.g. "in US, CA"

    def sentence(self) -> str:
        count = f"{self.offers}{'+' if self.at_least else ''} offer{_s(self.offers)}"
        note = f" ({self.note})" if self.note else ""
        return f"{self.change}: {count} from {_price(self.cheapest)}{note}."


Advice = Callable[[list[Offer]], "Hint | None"]
"""From the offers a relaxed search found: a concrete change and the offers it keeps."""


@dataclass(frozen=True)
class Diagnosis:
    headline: str
    query: str
    hints: tuple[Hint, ...]
    gpu_note: str = ""  # a GPU model no offer lists: did you mean ...?
    failure: str = ""  # why the search for a near miss stopped early

    @property
    def message(self) -> str:
        parts = [self.headline]
        if self.gpu_note:
            parts.append(self.gpu_note)
        parts.extend(hint.sentence() for hint in self.hints)
        if self.failure:
            parts.append(f"(Looking for a near miss failed: {self.failure}.)")
        elif not self.hints:
            parts.append("No single change to the request finds an offer.")
        if self.failure or not self.hints:
            parts.append(f"Query: {self.query}")
        return " ".join(parts)


@dataclass(frozen=True)
class _Relaxation:
    """One filter taken out; ``hint`` turns what the relaxed search found into advice (a
    concrete value and the offers that value keeps), or None when nothing fits."""

    relaxed: ResourceRequest
    hint: Advice
    rank: int = OTHER


def diagnose(
    request: ResourceRequest,
    search: Search,
    settings: ChosenOptions | None = None,
    who: str | None = None,
    query: str | None = None,
) -> Diagnosis:
    """Why ``request`` (whose own search found nothing) finds no offer. ``settings`` are
    the run's options when known, to tell an option from a resource; ``who`` names the
    rules (default: the request's); ``query`` is the one that found nothing (default: the
    request's). Searches at most once per filter the request has, plus once for the GPU
    models, and fewer when an answer makes the rest moot: a misspelt model whose correction
    finds offers, or a model no offer lists (no other filter can help then). A failing
    search ends the diagnosis, never hides it."""
    origin = _Origin.of(request, settings)
    headline = _headline(request, origin, who or _who(request.rule))
    gpu_note, failure = "", ""
    ranked: list[tuple[int, float, Hint]] = []
    try:
        guess = None
        if request.gpu_name:
            gpu_note, guess = _gpu_name_check(request, search)
        relaxations = _relaxations(request, origin, guess)
        if gpu_note and guess is None:  # no offer lists the model: only dropping it can help
            relaxations = relaxations[:1]
        for relaxation in relaxations:
            found = search(relaxation.relaxed, RELAXED_LIMIT)
            hint = relaxation.hint(found) if found else None
            if hint is not None:
                hint = replace(hint, at_least=len(found) >= RELAXED_LIMIT)
                ranked.append((relaxation.rank, hint.cheapest, hint))
                if relaxation.rank == MEANT:
                    break  # the corrected model is all the user needs
    except MarketplaceError as error:
        failure = str(error).strip().rstrip(".")
    ranked.sort(key=lambda entry: entry[:2])
    most = 1 if ranked and ranked[0][0] == MEANT else MAX_HINTS
    hints = tuple(hint for _, _, hint in ranked[:most])
    return Diagnosis(headline, query or request.offer_query(), hints, gpu_note, failure)


# -- where each value came from ----------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    """What the user changes for each filter: an option or the rule's resource. Without
    the run's settings, a value both can set names both. The ``*_set`` texts take the new
    value (twice, for the "or" form)."""

    gpu: str
    gpu_set: str
    disk_set: str
    disk_is_option: bool
    extra_query: str
    geolocation: str  # as the user wrote it (a region, or country codes)

    @classmethod
    def of(cls, request: ResourceRequest, settings: ChosenOptions | None) -> _Origin:
        option_gpu = settings.gpu_name if settings else None
        if settings is None:
            gpu = "resource `gpu_model` (or `--vastai-gpu-name`)"
            gpu_set = "resource `gpu_model='{}'` (or `--vastai-gpu-name {}`)"
        elif option_gpu and " ".join(option_gpu.replace("_", " ").split()) == request.gpu_name:
            gpu, gpu_set = "`--vastai-gpu-name`", "`--vastai-gpu-name {}`"
        else:
            gpu, gpu_set = "resource `gpu_model`", "resource `gpu_model='{}'`"
        disk_option = DEFAULTS["disk"] if settings is None else settings.disk
        disk_is_option = request.disk_gb == disk_option
        if disk_is_option:
            disk_set = "`--vastai-disk {}`"
        elif settings is None:
            disk_set = "resource `disk_mb={}000` (or `--vastai-disk {}`)"
        else:
            disk_set = "resource `disk_mb={}000`"
        search_query = ((settings.search_query if settings else None) or "").strip()
        if settings is None or (search_query and search_query != request.extra_query):
            extra = "`--vastai-search-query` / resource `vastai_query`"
        else:
            extra = "`--vastai-search-query`" if search_query else "resource `vastai_query`"
        codes = frozenset(request.geolocation)
        region = next((name for name, members in REGIONS.items() if members == codes), None)
        where = (settings.geolocation if settings else None) or region or ",".join(codes)
        return cls(gpu, gpu_set, disk_set, disk_is_option, extra, where)


def _is_default(option: str, value: object) -> bool:
    """Is ``value`` what the option is when the user sets nothing?"""
    return DEFAULTS[option] == value


def _now(value: str, option: str, raw: object) -> str:
    """The current value, noting when it is what the user gets by setting nothing."""
    return f"now {value}, the default" if _is_default(option, raw) else f"now {value}"


# -- the headline --------------------------------------------------------------------------


def _who(rule: str) -> str:
    return rule if rule.startswith("group ") else f"rule {rule}"


def _headline(request: ResourceRequest, origin: _Origin, who: str) -> str:
    gpu = _gpu(request.gpu_name) if request.gpu_name else ""
    if request.num_gpus > 1:
        gpu = f"{request.num_gpus}x {gpu or 'GPU'}"
    kind = "interruptible " if request.interruptible else ""
    words = [f"No {kind}{gpu} offer" if gpu else f"No {kind}offer"]
    if request.geolocation:
        words.append(f"in {origin.geolocation}")
    if request.max_price is not None:
        words.append(f"under ${_exact(request.max_price)}/h")
    sizes = [
        request.cpu_cores and f">= {request.cpu_cores} cores",
        request.mem_gb and f">= {request.mem_gb:g} GB RAM",
        not _is_default("disk", request.disk_gb) and f">= {request.disk_gb} GB disk",
    ]
    if any(sizes):
        words.append("with " + ", ".join(size for size in sizes if size))
    if request.reliability:
        default = " (the default)" if _is_default("reliability", request.reliability) else ""
        words.append(f"at reliability >= {request.reliability:g}{default}")
    if request.datacenter_only:
        words.append("from datacenters only (the default)")
    if request.extra_query:
        words.append(f"matching '{request.extra_query}'")
    return " ".join(words) + f" for {who}."


# -- the GPU model -------------------------------------------------------------------------


def _gpu(name: str) -> str:
    """A model as the user writes it in a Snakefile or query (RTX_4090)."""
    return name.replace(" ", "_")


def _name_key(name: str) -> str:
    """Case, spaces, underscores and hyphens do not tell GPU models apart."""
    return re.sub(r"[\s_-]+", "", name).casefold()


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """The model in ``known`` that ``name`` most likely means, or None."""
    by_key = {_name_key(model): model for model in known}
    key = _name_key(name)
    if key in by_key:
        return by_key[key]
    close = difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.6)
    return by_key[close[0]] if close else None


def _gpu_name_check(request: ResourceRequest, search: Search) -> tuple[str, str | None]:
    """(a sentence when no offer lists the model, the model it probably means). One
    search with no filter but the SDK's defaults gives the models on the market."""
    assert request.gpu_name is not None
    everything = replace(
        request,
        num_gpus=1,
        gpu_name=None,
        cpu_cores=None,
        mem_gb=None,
        disk_gb=MIN_DISK_GB,
        geolocation=(),
        reliability=0.0,
        datacenter_only=False,
        max_price=None,
        extra_query="",
        interruptible=False,
    )
    known = sorted({offer.gpu_name for offer in search(everything, NAMES_LIMIT)})
    if not known or request.gpu_name in known:
        return "", None
    name = _gpu(request.gpu_name)
    guess = did_you_mean(request.gpu_name, known)
    if guess is not None:
        return f"No offer lists a GPU named {name}; did you mean {_gpu(guess)}?", guess
    listed = ", ".join(map(_gpu, known))
    return f"No offer lists a GPU named {name} (models listed: {listed}).", None


# -- one relaxation per filter -----------------------------------------------------------


def _relaxations(request: ResourceRequest, origin: _Origin, guess: str | None) -> list[_Relaxation]:
    """The request with each of its filters taken out alone, each with the advice its
    offers give. A GPU model that is probably misspelt is corrected instead, and then in
    every other relaxation too."""
    found: list[_Relaxation] = []
    base, also = request, ""
    if guess is not None:
        also = f"With {origin.gpu_set.format(_gpu(guess), _gpu(guess))}"
        base = replace(request, gpu_name=guess)
        found.append(_Relaxation(base, _every(also), MEANT))

    def add(present: object, hint: Advice, default: bool = False, **relaxed: Any) -> None:
        if present:
            rank = DEFAULT if default else OTHER
            found.append(_Relaxation(replace(base, **relaxed), _along(also, hint), rank))

    fix = f"Without {origin.gpu} (now {_gpu(request.gpu_name or '')})"
    add(request.gpu_name and guess is None, _every(fix, _models), gpu_name=None)
    add(request.num_gpus > 1, partial(_gpu_count, request), num_gpus=1)
    fix = f"Without `--vastai-geolocation` (now {origin.geolocation})"
    add(request.geolocation, _every(fix, _countries), geolocation=())
    default = _is_default("reliability", request.reliability)
    add(request.reliability, partial(_reliability, request), default, reliability=0.0)
    fix = "With `--vastai-no-datacenter` (now datacenters only, the default)"
    add(request.datacenter_only, _every(fix), True, datacenter_only=False)
    add(request.max_price is not None, partial(_price_cap, request), max_price=None)
    add(request.cpu_cores, partial(_cores, request), cpu_cores=None)
    add(request.mem_gb, partial(_memory, request), mem_gb=None)
    default = origin.disk_is_option and _is_default("disk", request.disk_gb)
    disk = partial(_disk, request, origin)
    add(request.disk_gb > MIN_DISK_GB, disk, default, disk_gb=MIN_DISK_GB)
    fix = f"Without {origin.extra_query} (now '{request.extra_query}')"
    add(request.extra_query, _every(fix), extra_query="")
    return found


def _along(first: str, advice: Advice) -> Advice:
    """``advice`` on top of a first change (the corrected GPU model), if there is one."""
    if not first:
        return advice

    def combined(offers: list[Offer]) -> Hint | None:
        hint = advice(offers)
        if hint is None:
            return None
        return replace(hint, change=f"{first} and {hint.change[0].lower()}{hint.change[1:]}")

    return combined


def _all(change: str, offers: list[Offer], note: str = "") -> Hint:
    return Hint(change, len(offers), False, min(o.dph_total for o in offers), note)


def _every(change: str, note: Callable[[list[Offer]], str] | None = None) -> Advice:
    """Advice that keeps every offer found: taking the filter out is the change."""
    return lambda offers: _all(change, offers, note(offers) if note else "")


def _kept(change: str, offers: list[Offer], keep: Callable[[Offer], bool]) -> Hint | None:
    """The hint for the offers a suggested value keeps (None when it keeps none)."""
    kept = [offer for offer in offers if keep(offer)]
    return _all(change, kept) if kept else None


def _gpu_count(request: ResourceRequest, offers: list[Offer]) -> Hint | None:
    most = max(o.num_gpus for o in offers)
    change = f"With resource `gpu={most}` (now {request.num_gpus})"
    return _kept(change, offers, lambda o: o.num_gpus >= most)


def _reliability(request: ResourceRequest, offers: list[Offer]) -> Hint | None:
    """The highest reliability among the offers, rounded down so that it keeps them."""
    best = math.floor(max(o.reliability for o in offers) * 100) / 100
    now = _now(f"{request.reliability:g}", "reliability", request.reliability)
    change = f"With `--vastai-reliability {best:g}` ({now})"
    return _kept(change, offers, lambda o: o.reliability >= best)


def _price_cap(request: ResourceRequest, offers: list[Offer]) -> Hint | None:
    """The lowest price, rounded up to the cent so that it keeps that offer."""
    assert request.max_price is not None
    cap = math.ceil(min(o.dph_total for o in offers) * 100) / 100
    change = f"With `--vastai-max-price {cap:g}` (now {_exact(request.max_price)})"
    return _kept(change, offers, lambda o: o.dph_total <= cap)


def _cores(request: ResourceRequest, offers: list[Offer]) -> Hint | None:
    most = math.floor(max(o.cpu_cores for o in offers))
    change = f"With `threads: {most}` (now {request.cpu_cores})"
    return _kept(change, offers, lambda o: o.cpu_cores >= most) if most >= 1 else None


def _memory(request: ResourceRequest, offers: list[Offer]) -> Hint | None:
    most_mb = max(o.cpu_ram_mb for o in offers) // 1000 * 1000
    change = f"With resource `mem_mb={most_mb}` (now {request.mem_gb:g} GB)"
    return _kept(change, offers, lambda o: o.cpu_ram_mb >= most_mb) if most_mb else None


def _disk(request: ResourceRequest, origin: _Origin, offers: list[Offer]) -> Hint | None:
    """The largest disk offered. The relaxed search priced the smallest disk; the prices
    quoted are those of renting the suggested one."""
    most = math.floor(max(o.disk_gb for o in offers))
    if most < MIN_DISK_GB:
        return None
    kept = [
        replace(o, dph_total=o.dph_total + o.storage_dph * (most / MIN_DISK_GB - 1))
        for o in offers
        if o.disk_gb >= most
    ]
    size = f"{request.disk_gb} GB"
    now = _now(size, "disk", request.disk_gb) if origin.disk_is_option else f"now {size}"
    return _all(f"With {origin.disk_set.format(most, most)} ({now})", kept)


# -- wording -------------------------------------------------------------------------------


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _models(offers: list[Offer]) -> str:
    return _listed(_gpu(offer.gpu_name) for offer in offers)


def _countries(offers: list[Offer]) -> str:
    return "in " + _listed(offer.geolocation[-2:] for offer in offers)


def _listed(items: Iterable[str], most: int = 5) -> str:
    """The first few distinct values, in the offers' (cheapest first) order."""
    return ", ".join(list(dict.fromkeys(item for item in items if item))[:most])


def _price(dollars: float) -> str:
    """An offer's price, to the cent (a tenth of a cent below $0.10)."""
    return f"${dollars:.2f}/h" if dollars >= 0.1 else f"${dollars:.3f}/h"


def _exact(dollars: float) -> str:
    """A price the user gave, as they gave it, in cents when it has none finer."""
    return f"{dollars:.2f}" if round(dollars, 2) == dollars else f"{dollars:g}"
