"""What a Snakemake job asks of Vast.ai: job resources + ``--vastai-*`` options become a
validated, immutable :class:`ResourceRequest`, which yields the offer query (vastai query
syntax), the rent parameters and the warm pool's :class:`Signature`.

Mapping (one row per Snakefile resource or option; every query term is "at least" unless
it says otherwise, and the cheapest-first offer order then prefers the smallest machine):

============================  =============================================================
``gpu`` / ``nvidia_gpu`` = N  ``num_gpus>=N``, and the job gets N GPUs of its own. Unset
                              or 0: a CPU job; it still searches ``num_gpus>=1`` (Vast.ai
                              only rents GPU machines) but takes no GPU, so it can share an
                              instance with GPU jobs. Negative or fractional counts are
                              errors, and so are both names with different values.
``gpu_model`` (job), else     ``gpu_name=RTX_4090``. Spaces or underscores are both fine;
``--vastai-gpu-name``         the query spells spaces as ``_``.
``threads``                   ``cpu_cores_effective>=threads`` if above 1 (every offer has
                              a CPU, and a shorter query reads better in logs). A group
                              job uses its combined ``_cores``.
``mem_mb`` (or ``mem``)       ``cpu_ram>=GB`` with GB = mem_mb / 1000 rounded up to 0.1
                              (the SDK multiplies by 1000 again). mem_mb=0 adds no filter.
``disk_mb`` (or ``disk``)     rented disk = max(``--vastai-disk``, ceil(disk_mb / 1000)) GB,
                              and ``disk_space>=`` that. Note that with
                              ``--default-resources`` a job without input has
                              disk_mb=50000, so 50 GB.
``--vastai-reliability`` R    ``reliability>=R``; 0 adds no filter.
``--vastai-no-datacenter``    drops the otherwise added ``datacenter=True``.
``--vastai-geolocation``      ``geolocation in [DE,PL]``: region shortcuts (EU, NA, AS, AF,
                              LC, OC; see ``regions.py``) and/or 2-letter country codes.
``--vastai-max-price`` P      ``dph_total<=P`` ($/h, storage included).
``--vastai-search-query``,    appended verbatim, in this order, so they can add any filter
``vastai_query`` (job)        or override one above (the SDK keeps the last value of a
                              field and operator; ``field=any`` removes a filter).
``deploy`` (job)              comma-separated globs shipped besides the workflow sources.
============================  =============================================================

Whatever the source, the whole query must parse with the SDK's own parser and name only
fields it knows, so a bad value fails before anything is searched or rented.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from snakemake_executor_plugin_vastai.base.errors import UserError
from snakemake_executor_plugin_vastai.market.marketplace import parse_offer_query
from snakemake_executor_plugin_vastai.market.regions import expand_geolocation
from snakemake_executor_plugin_vastai.market.request import MIN_DISK_GB, ResourceRequest

if TYPE_CHECKING:
    from snakemake_interface_executor_plugins.jobs import JobExecutorInterface

    from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings


JOB_RESOURCES = frozenset({"vastai_query"})
"""The ``vastai_*`` resources this plugin reads; any other one is a typo and an error."""

_GPU_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]*")
_ORDER_TERM = re.compile(r"[+-]?[A-Za-z_][A-Za-z0-9_]*[+-]?")
_QUERY_FIX = (
    "Write filters as `field operator value` separated by spaces, e.g. "
    "'cuda_vers>=12.1 inet_down>=200'; `vastai search offers --help` lists the fields."
)


class ResourceError(UserError):
    """A job resource Vast.ai cannot serve. The message names the job, the resource, the
    bad value, why it is bad and how to fix it, because the user only sees this text."""

    def __init__(self, job: str, resource: str, value: object, why: str, fix: str) -> None:
        super().__init__(f"{job}: resource {resource}={value!r} is invalid: {why}. {fix}")


class SettingsError(UserError):
    """A ``--vastai-*`` option with a bad value, worded like :class:`ResourceError`."""

    def __init__(self, option: str, value: object, why: str, fix: str) -> None:
        flag = "--vastai-" + option.replace("_", "-")
        super().__init__(f"Option {flag}={value!r} is invalid: {why}. {fix}")


def request_of(
    job: JobExecutorInterface,
    settings: ExecutorSettings,
    is_preemptible: Callable[[str], bool] | None = None,
) -> ResourceRequest:
    """Read and check the job's resources against the options. ``is_preemptible`` is
    Snakemake's ``preemptible_rules.is_preemptible``: a group is interruptible only if
    all its rules are. Raises ResourceError or SettingsError before any API call."""
    options = _read_settings(settings)
    if job.is_group():
        rules = ", ".join(sorted(job.rules))
        where, rule = (
            f"Group '{job.groupid}' (rules {rules})",
            f"group {job.groupid} (rules {rules})",
        )
    else:
        where, rule = f"Rule '{job.name}'", job.name
    resources = dict(job.resources.items())
    for name in resources:
        if name.startswith("vastai_") and name not in JOB_RESOURCES:
            raise ResourceError(
                where,
                name,
                resources[name],
                "the vastai plugin knows no such resource",
                f"Use one of: {', '.join(sorted(JOB_RESOURCES))}.",
            )
    job_query = _job_text(resources, "vastai_query", where)
    # A group job's threads are its combined resources["_cores"].
    threads = _thread_count(job.threads, where)
    mem_mb = _size_mb(resources, "mem_mb", where)
    disk_mb = _size_mb(resources, "disk_mb", where)
    gpus = _gpu_count(resources, where)
    request = ResourceRequest(
        rule=rule,
        num_gpus=max(1, gpus),
        gpu_name=_job_gpu_name(resources, where) or options.gpu_name,
        cpu_cores=threads if threads > 1 else None,
        mem_gb=math.ceil(mem_mb / 100) / 10 if mem_mb else None,
        disk_gb=max(options.disk_gb, math.ceil(disk_mb / 1000)),
        image=options.image,
        geolocation=options.geolocation,
        reliability=options.reliability,
        datacenter_only=options.datacenter_only,
        max_price=options.max_price,
        extra_query=" ".join(text for text in (options.search_query, job_query) if text),
        interruptible=is_preemptible is not None and all(map(is_preemptible, job.rules)),
        deploy=_deploy_globs(_job_text(resources, "deploy", where), where),
        gpus=gpus,
        job_disk_gb=disk_mb / 1000,
        runtime_hours=_runtime_hours(resources),
    )
    try:
        parse_offer_query(request.offer_query())
    except ValueError as e:
        # The options were parsed on their own above, so the job's text is to blame.
        raise ResourceError(
            where, "vastai_query", job_query, f"the vastai SDK rejects it ({e})", _QUERY_FIX
        ) from None
    return request


# Numeric options outside the request: (name, lowest allowed, whether the bound is allowed).
_LIMITS = (
    ("boot_timeout", 1, True),
    ("max_runtime", 0, True),
    ("deadman", 0, True),
    ("bid_factor", 1, True),
    ("pool_ttl", 0, True),
    ("pool_max_instances", 1, True),
    ("pool_max_lifetime", 0, True),
    ("max_total_price", 0, False),
    ("budget", 0, False),
    ("keep_warm", 0, True),
    ("pool_stop_after", 0, True),
    ("start_timeout", 1, True),
)


def validate_settings(settings: ExecutorSettings) -> None:
    """Check every option once at start, so a typo fails before any job is scheduled."""
    _read_settings(settings)
    for name, lowest, inclusive in _LIMITS:
        value = getattr(settings, name)
        if value is None:
            continue
        fine = _is_number(value) and (value >= lowest if inclusive else value > lowest)
        if not fine:
            bound = f"at least {lowest}" if inclusive else f"above {lowest}"
            raise SettingsError(name, value, f"it must be {bound}", f"Give a number {bound}.")
    _check_keep_warm(settings)
    terms = [term.strip() for term in settings.order.split(",")]
    bad = [term for term in terms if not _ORDER_TERM.fullmatch(term)]
    if bad:
        raise SettingsError(
            "order",
            settings.order,
            f"{', '.join(repr(t) for t in bad)} is not an offer field with an optional direction",
            "Give comma-separated offer fields, each optionally followed by - (descending) "
            "or + (ascending), e.g. dph_total or dlperf_usd-,dph_total.",
        )


def _check_keep_warm(settings: ExecutorSettings) -> None:
    """Kept instances are ended by their own dead-man switch: without one, nothing would."""
    if not settings.keep_warm:
        return
    if settings.keep_instances:
        raise SettingsError(
            "keep_warm",
            settings.keep_warm,
            "it cannot go with --vastai-keep-instances, which leaves every instance up unguarded",
            "Drop --vastai-keep-instances: --vastai-keep-warm keeps idle instances for the "
            "next run and ends them at the deadline.",
        )
    if not settings.deadman:
        raise SettingsError(
            "keep_warm",
            settings.keep_warm,
            "it needs the dead-man switch (--vastai-deadman 0 turns it off), which ends a "
            "kept instance at its deadline when no run comes back",
            "Give --vastai-deadman a number of seconds, or drop --vastai-keep-warm.",
        )


@dataclass(frozen=True)
class _Options:
    """The options every request shares, read and checked."""

    gpu_name: str | None
    max_price: float | None
    geolocation: tuple[str, ...]
    disk_gb: int
    image: str
    reliability: float
    datacenter_only: bool
    search_query: str


def _read_settings(settings: ExecutorSettings) -> _Options:
    gpu_name = None if settings.gpu_name is None else _normalise_gpu_name(settings.gpu_name)
    if gpu_name == "":
        raise SettingsError(
            "gpu_name",
            settings.gpu_name,
            "it is not a GPU model name",
            "Use the name Vast.ai lists, e.g. RTX_4090 or 'RTX 4090'.",
        )
    price = settings.max_price
    if price is not None and not (_is_number(price) and 0 < price < math.inf):
        raise SettingsError(
            "max_price", price, "a price cap must be above 0 $/h", "Give e.g. 0.5, or omit it."
        )
    try:
        geolocation = expand_geolocation(settings.geolocation) if settings.geolocation else ()
    except ValueError as e:
        raise SettingsError(
            "geolocation",
            settings.geolocation,
            str(e),
            "Give a region or 2-letter country codes, comma separated, e.g. EU or DE,PL.",
        ) from None
    disk = settings.disk
    if not (isinstance(disk, int) and not isinstance(disk, bool) and disk >= MIN_DISK_GB):
        raise SettingsError(
            "disk",
            disk,
            f"Vast.ai rents at least {MIN_DISK_GB} GB of disk",
            f"Give a whole number of GB, {MIN_DISK_GB} or more.",
        )
    image = settings.image
    if not (isinstance(image, str) and image) or any(c.isspace() for c in image):
        raise SettingsError(
            "image",
            image,
            "it is not a Docker image reference",
            "Give an image such as vastai/pytorch:@vastai-automatic-tag.",
        )
    reliability = settings.reliability
    if not (_is_number(reliability) and 0 <= reliability <= 1):
        raise SettingsError(
            "reliability",
            reliability,
            "host reliability is a fraction between 0 and 1",
            "Give e.g. 0.98, or 0 to rent from any host.",
        )
    search_query = (settings.search_query or "").strip()
    try:
        parse_offer_query(search_query)
    except ValueError as e:
        raise SettingsError(
            "search_query", settings.search_query, f"the vastai SDK rejects it ({e})", _QUERY_FIX
        ) from None
    return _Options(
        gpu_name=gpu_name,
        max_price=None if price is None else float(price),
        geolocation=geolocation,
        disk_gb=disk,
        image=image,
        reliability=float(reliability),
        datacenter_only=not settings.no_datacenter,
        search_query=search_query,
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _runtime_hours(resources: Mapping[str, Any]) -> float | None:
    """Snakemake's ``runtime`` (minutes) in hours; None when the job gives no number."""
    minutes = resources.get("runtime")
    return minutes / 60 if _is_number(minutes) and minutes > 0 else None


def _normalise_gpu_name(name: object) -> str:
    """'RTX_4090', ' rtx  4090' -> 'RTX 4090'-style spacing (case kept); '' if not a name."""
    if not isinstance(name, str) or not _GPU_NAME.fullmatch(name.strip()):
        return ""
    return " ".join(name.replace("_", " ").split())


def _job_gpu_name(resources: Mapping[str, Any], where: str) -> str | None:
    value = resources.get("gpu_model")
    if value is None:
        return None
    name = _normalise_gpu_name(value)
    if not name:
        raise ResourceError(
            where,
            "gpu_model",
            value,
            "it is not a GPU model name",
            "Use the name Vast.ai lists, e.g. gpu_model='RTX_4090' (or 'RTX 4090').",
        )
    return name


def _whole(value: object) -> int | None:
    """``value`` as an int if it is a whole number (2 or 2.0), else None."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _gpu_count(resources: Mapping[str, Any], where: str) -> int:
    given = {name: resources[name] for name in ("gpu", "nvidia_gpu") if name in resources}
    for name, value in given.items():
        count = _whole(value)
        if count is None or count < 0:
            raise ResourceError(
                where,
                name,
                value,
                "a GPU count must be a whole number, 0 or more",
                f"Set {name} to the number of GPUs the job uses (0 or unset: a CPU job).",
            )
    counts = {_whole(value) for value in given.values()}
    if len(counts) > 1:
        raise ResourceError(
            where,
            "nvidia_gpu",
            given["nvidia_gpu"],
            f"it differs from gpu={given['gpu']!r}",
            "Set only gpu (Snakemake's standard name), or both to the same value.",
        )
    return counts.pop() if counts else 0


def _thread_count(threads: object, where: str) -> int:
    count = _whole(threads)
    if count is None or count < 1:
        raise ResourceError(
            where,
            "threads",
            threads,
            "a job needs a whole number of threads, at least 1",
            "Set threads: to 1 or more.",
        )
    return count


def _size_mb(resources: Mapping[str, Any], name: str, where: str) -> float:
    """A ``*_mb`` resource as a number of MB; 0 if unset."""
    value = resources.get(name, 0)
    if not (_is_number(value) and 0 <= value < math.inf):
        unit_free = name.removesuffix("_mb")
        raise ResourceError(
            where,
            name,
            value,
            "it must be a number of megabytes, 0 or more",
            f"Set e.g. {name}=16000, or {unit_free}='16GB'.",
        )
    return value


def _job_text(resources: Mapping[str, Any], name: str, where: str) -> str:
    value = resources.get(name, "")
    if not isinstance(value, str):
        raise ResourceError(
            where, name, value, "it must be a string", f"Quote it, e.g. {name}='...'."
        )
    return value.strip()


def _deploy_globs(text: str, where: str) -> tuple[str, ...]:
    """Comma-separated globs, relative to the working directory that is shipped."""
    globs = tuple(part.strip() for part in text.split(",") if part.strip())
    for glob in globs:
        path = PurePosixPath(glob)
        if path.is_absolute() or ".." in path.parts:
            raise ResourceError(
                where,
                "deploy",
                text,
                f"{glob!r} points outside the working directory, which is what gets shipped",
                "Give paths or globs relative to the working directory, e.g. "
                "deploy='scripts/*.py,ref/genome.fa'.",
            )
    return globs
