"""Resource mapping: job resources + options -> offer query (and what the SDK parses it to),
validation messages, warm-pool signatures, and one run of real Snakemake jobs through it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from snakemake_executor_plugin_vastai.edge.resources import (
    ResourceError,
    SettingsError,
    request_of,
    validate_settings,
)
from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings
from snakemake_executor_plugin_vastai.market.marketplace import parse_offer_query
from snakemake_executor_plugin_vastai.market.regions import COUNTRIES, REGIONS, expand_geolocation
from snakemake_executor_plugin_vastai.market.request import MIN_DISK_GB, ResourceRequest, Signature


@dataclass(eq=False)  # hashable, as Snakemake's jobs are (the edge keys its plan by job)
class FakeJob:
    """The attributes of a Snakemake job that request_of reads (the real test is at the end)."""

    resources: dict[str, Any]
    threads: int = 1
    name: str = "train"
    rules: list[str] | set[str] = field(default_factory=lambda: ["train"])
    groupid: str | None = None
    jobid: int | str = 1

    def is_group(self) -> bool:
        return self.groupid is not None


def group_job(resources: dict[str, Any], threads: int = 1) -> FakeJob:
    return FakeJob(
        {**resources, "_cores": threads},
        threads=threads,
        name="g1_a_b",
        rules={"b", "a"},
        groupid="g1",
        jobid="5f0c6c8e-0000-4000-8000-000000000000",
    )


def request(resources: dict[str, Any], threads: int = 1, **options: Any) -> ResourceRequest:
    return request_of(FakeJob(resources, threads), ExecutorSettings(**options))


BASE_QUERY = "num_gpus>=1 disk_space>=40 reliability>=0.98 datacenter=True"
BASE_PARSED = {
    "num_gpus": {"gte": "1"},
    "disk_space": {"gte": "40"},
    "reliability": {"gte": "0.98"},
    "datacenter": {"eq": True},
}


def without(parsed: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in parsed.items() if k not in names}


# (id, job resources, threads, options, query, what the SDK's parse_query makes of it)
MAPPING_CASES = [
    ("defaults", {}, 1, {}, BASE_QUERY, BASE_PARSED),
    (
        "gpu",
        {"gpu": 2},
        1,
        {},
        "num_gpus>=2 disk_space>=40 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "num_gpus": {"gte": "2"}},
    ),
    (
        "nvidia_gpu",
        {"nvidia_gpu": 2},
        1,
        {},
        "num_gpus>=2 disk_space>=40 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "num_gpus": {"gte": "2"}},
    ),
    (
        "gpu and nvidia_gpu agree",
        {"gpu": 2, "nvidia_gpu": 2.0},
        1,
        {},
        "num_gpus>=2 disk_space>=40 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "num_gpus": {"gte": "2"}},
    ),
    (
        "gpu_model with underscore",
        {"gpu_model": "RTX_4090"},
        1,
        {},
        "num_gpus>=1 gpu_name=RTX_4090 disk_space>=40 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "gpu_name": {"eq": "RTX 4090"}},
    ),
    (
        "gpu_model with spaces",
        {"gpu_model": " RTX  4090 "},
        1,
        {},
        "num_gpus>=1 gpu_name=RTX_4090 disk_space>=40 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "gpu_name": {"eq": "RTX 4090"}},
    ),
    (
        "gpu_name option",
        {},
        1,
        {"gpu_name": "A100 SXM4"},
        "num_gpus>=1 gpu_name=A100_SXM4 disk_space>=40 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "gpu_name": {"eq": "A100 SXM4"}},
    ),
    (
        "gpu_model beats gpu_name option",
        {"gpu_model": "H100_NVL"},
        1,
        {"gpu_name": "RTX_3090"},
        "num_gpus>=1 gpu_name=H100_NVL disk_space>=40 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "gpu_name": {"eq": "H100 NVL"}},
    ),
    (
        "threads",
        {},
        4,
        {},
        "num_gpus>=1 cpu_cores_effective>=4 disk_space>=40 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "cpu_cores_effective": {"gte": "4"}},
    ),
    (
        "mem_mb whole GB",
        {"mem_mb": 2000},
        1,
        {},
        "num_gpus>=1 cpu_ram>=2 disk_space>=40 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "cpu_ram": {"gte": 2000.0}},
    ),
    (
        "mem_mb rounded up to 0.1 GB",
        {"mem_mb": 2001},
        1,
        {},
        "num_gpus>=1 cpu_ram>=2.1 disk_space>=40 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "cpu_ram": {"gte": 2100.0}},
    ),
    (
        "mem_mb float",
        {"mem_mb": 1500.5},
        1,
        {},
        "num_gpus>=1 cpu_ram>=1.6 disk_space>=40 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "cpu_ram": {"gte": 1600.0}},
    ),
    ("mem_mb 0 adds no filter", {"mem_mb": 0}, 1, {}, BASE_QUERY, BASE_PARSED),
    (
        "disk_mb raises the disk",
        {"disk_mb": 100_000},
        1,
        {},
        "num_gpus>=1 disk_space>=100 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "disk_space": {"gte": "100"}},
    ),
    (
        "disk_mb rounded up to a GB",
        {"disk_mb": 40_001},
        1,
        {},
        "num_gpus>=1 disk_space>=41 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "disk_space": {"gte": "41"}},
    ),
    ("disk_mb below the disk option", {"disk_mb": 20_000}, 1, {}, BASE_QUERY, BASE_PARSED),
    (
        "disk option",
        {},
        1,
        {"disk": 80},
        "num_gpus>=1 disk_space>=80 reliability>=0.98 datacenter=True",
        {**BASE_PARSED, "disk_space": {"gte": "80"}},
    ),
    (
        "reliability 0 adds no filter",
        {},
        1,
        {"reliability": 0},
        "num_gpus>=1 disk_space>=40 datacenter=True",
        without(BASE_PARSED, "reliability"),
    ),
    (
        "reliability 1",
        {},
        1,
        {"reliability": 1},
        "num_gpus>=1 disk_space>=40 reliability>=1 datacenter=True",
        {**BASE_PARSED, "reliability": {"gte": "1"}},
    ),
    (
        "no_datacenter",
        {},
        1,
        {"no_datacenter": True},
        "num_gpus>=1 disk_space>=40 reliability>=0.98",
        without(BASE_PARSED, "datacenter"),
    ),
    (
        "country codes",
        {},
        1,
        {"geolocation": "pl, DE"},
        f"{BASE_QUERY} geolocation in [DE,PL]",
        {**BASE_PARSED, "geolocation": {"in": ["DE", "PL"]}},
    ),
    (
        "region",
        {},
        1,
        {"geolocation": "NA"},
        f"{BASE_QUERY} geolocation in [BM,CA,GL,PM,US]",
        {**BASE_PARSED, "geolocation": {"in": ["BM", "CA", "GL", "PM", "US"]}},
    ),
    (
        "max_price",
        {},
        1,
        {"max_price": 0.5},
        f"{BASE_QUERY} dph_total<=0.5",
        {**BASE_PARSED, "dph_total": {"lte": "0.5"}},
    ),
    (
        "max_price small, no exponent",
        {},
        1,
        {"max_price": 0.00001},
        f"{BASE_QUERY} dph_total<=0.00001",
        {**BASE_PARSED, "dph_total": {"lte": "0.00001"}},
    ),
    (
        "search_query with alias",
        {},
        1,
        {"search_query": " cuda_vers>=12.1 inet_down>=200 "},
        f"{BASE_QUERY} cuda_vers>=12.1 inet_down>=200",
        {**BASE_PARSED, "cuda_max_good": {"gte": "12.1"}, "inet_down": {"gte": "200"}},
    ),
    (
        "vastai_query with unit multiplier",
        {"vastai_query": "gpu_ram>=24"},
        1,
        {},
        f"{BASE_QUERY} gpu_ram>=24",
        {**BASE_PARSED, "gpu_ram": {"gte": 24000.0}},
    ),
    (
        "search_query then vastai_query",
        {"vastai_query": "cuda_vers>=12.4"},
        1,
        {"search_query": "cuda_vers>=12.1"},
        f"{BASE_QUERY} cuda_vers>=12.1 cuda_vers>=12.4",
        {**BASE_PARSED, "cuda_max_good": {"gte": "12.4"}},
    ),
    (
        "vastai_query overrides a generated filter",
        {"vastai_query": "datacenter=any num_gpus>=4"},
        1,
        {},
        f"{BASE_QUERY} datacenter=any num_gpus>=4",
        {**without(BASE_PARSED, "datacenter"), "num_gpus": {"gte": "4"}},
    ),
    (
        "everything",
        {"gpu": 1, "gpu_model": "RTX_4090", "mem_mb": 2000, "disk_mb": 1000},
        2,
        {"geolocation": "DE,PL", "max_price": 0.5, "search_query": "cuda_vers>=12.1"},
        "num_gpus>=1 gpu_name=RTX_4090 cpu_cores_effective>=2 cpu_ram>=2 disk_space>=40 "
        "reliability>=0.98 datacenter=True geolocation in [DE,PL] dph_total<=0.5 "
        "cuda_vers>=12.1",
        {
            "num_gpus": {"gte": "1"},
            "gpu_name": {"eq": "RTX 4090"},
            "cpu_cores_effective": {"gte": "2"},
            "cpu_ram": {"gte": 2000.0},
            "disk_space": {"gte": "40"},
            "reliability": {"gte": "0.98"},
            "datacenter": {"eq": True},
            "geolocation": {"in": ["DE", "PL"]},
            "dph_total": {"lte": "0.5"},
            "cuda_max_good": {"gte": "12.1"},
        },
    ),
]


@pytest.mark.parametrize(
    ("resources", "threads", "options", "query", "parsed"),
    [case[1:] for case in MAPPING_CASES],
    ids=[case[0] for case in MAPPING_CASES],
)
def test_offer_query_and_what_the_sdk_reads(resources, threads, options, query, parsed):
    built = request(resources, threads, **options)
    assert built.offer_query() == query
    assert parse_offer_query(query) == parsed


def test_sdk_search_body_matches_our_parse():
    """search_offers adds only its default filters to what parse_offer_query returns."""
    from vastai.api.query import offers_alias, offers_fields, offers_mult, parse_query

    query = request({"gpu_model": "RTX_4090", "mem_mb": 32000}, 2, geolocation="EU").offer_query()
    defaults = {"verified": {"eq": True}, "external": {"eq": False}, "rentable": {"eq": True}}
    sdk = parse_query(query, dict(defaults), offers_fields, offers_alias, offers_mult)
    assert sdk == {**defaults, **parse_offer_query(query)}
    assert sdk["geolocation"]["in"] == sorted(REGIONS["EU"])


def test_request_fields():
    built = request(
        {
            "gpu": 2,
            "gpu_model": "RTX_4090",
            "mem_mb": 2001,
            "deploy": " scripts/*.py, ref/a.fa,",
            "runtime": 90,
        },
        threads=3,
        geolocation="de",
        max_price=1,
    )
    assert dataclasses.asdict(built) == {
        "rule": "train",
        "num_gpus": 2,
        "gpu_name": "RTX 4090",
        "cpu_cores": 3,
        "mem_gb": 2.1,
        "disk_gb": 40,
        "image": ExecutorSettings().image,
        "geolocation": ("DE",),
        "reliability": 0.98,
        "datacenter_only": True,
        "max_price": 1.0,
        "extra_query": "",
        "interruptible": False,
        "deploy": ("scripts/*.py", "ref/a.fa"),
        "gpus": 2,
        "job_disk_gb": 0.0,
        "upload_gb": 0.0,  # the run adds what the inputs weigh
        "runtime_hours": 1.5,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.num_gpus = 3  # type: ignore[misc]


def test_single_thread_and_no_memory_mean_no_filter():
    built = request({"mem_mb": 0}, threads=1)
    assert (built.cpu_cores, built.mem_gb) == (None, None)
    assert (built.signature().cpu_cores, built.signature().mem_gb) == (1, 0.0)


def test_group_job_uses_combined_cores_and_names_its_rules():
    job = group_job({"mem_mb": 4000, "gpu": 1}, threads=3)
    built = request_of(job, ExecutorSettings())
    assert built.rule == "group g1 (rules a, b)"
    assert built.offer_query() == (
        "num_gpus>=1 cpu_cores_effective>=3 cpu_ram>=4 disk_space>=40 reliability>=0.98 "
        "datacenter=True"
    )


@pytest.mark.parametrize(
    ("job", "preemptible", "expected"),
    [
        (FakeJob({}), None, False),
        (FakeJob({}), {"train"}, True),
        (FakeJob({}), {"other"}, False),
        (group_job({}), {"a", "b"}, True),
        (group_job({}), {"a"}, False),
    ],
)
def test_interruptible_only_if_every_rule_is_preemptible(job, preemptible, expected):
    is_preemptible = None if preemptible is None else preemptible.__contains__
    built = request_of(job, ExecutorSettings(), is_preemptible)
    assert built.interruptible is expected
    assert built.signature().interruptible is expected


GPU_FIX = "Remove the {0} resource or set it to 1 or more."

# (id, job resources, threads, resource named, value shown, text that must appear)
RESOURCE_ERRORS = [
    ("gpu negative", {"gpu": -1}, 1, "gpu", "-1", "0 or more"),
    ("gpu fractional", {"gpu": 1.5}, 1, "gpu", "1.5", "whole number"),
    ("gpu text", {"gpu": "two"}, 1, "gpu", "'two'", "whole number"),
    ("gpu bool", {"gpu": True}, 1, "gpu", "True", "whole number"),
    (
        "gpu names disagree",
        {"gpu": 1, "nvidia_gpu": 2},
        1,
        "nvidia_gpu",
        "2",
        "differs from gpu=1. Set only gpu",
    ),
    ("gpu_model empty", {"gpu_model": ""}, 1, "gpu_model", "''", "gpu_model='RTX_4090'"),
    ("gpu_model quote", {"gpu_model": 'RTX"4090'}, 1, "gpu_model", "'RTX\"4090'", "RTX_4090"),
    ("gpu_model number", {"gpu_model": 4090}, 1, "gpu_model", "4090", "not a GPU model"),
    ("mem_mb negative", {"mem_mb": -1}, 1, "mem_mb", "-1", "mem='16GB'"),
    ("mem_mb text", {"mem_mb": "lots"}, 1, "mem_mb", "'lots'", "mem_mb=16000"),
    ("mem_mb infinite", {"mem_mb": float("inf")}, 1, "mem_mb", "inf", "megabytes"),
    ("disk_mb negative", {"disk_mb": -5}, 1, "disk_mb", "-5", "disk='16GB'"),
    ("disk_mb text", {"disk_mb": "big"}, 1, "disk_mb", "'big'", "disk_mb=16000"),
    ("threads 0", {}, 0, "threads", "0", "Set threads: to 1 or more"),
    ("vastai_query blank value", {"vastai_query": "cuda_vers>="}, 1, "vastai_query", "", "blank"),
    (
        "vastai_query unquoted space",
        {"vastai_query": "gpu_name=RTX 4090"},
        1,
        "vastai_query",
        "'gpu_name=RTX 4090'",
        "Unknown operator",
    ),
    (
        "vastai_query unknown field",
        {"vastai_query": "cuda_ver>=12"},
        1,
        "vastai_query",
        "'cuda_ver>=12'",
        "unknown offer field(s) cuda_ver",
    ),
    (
        "vastai_query list for a multiplied field",
        {"vastai_query": "cpu_ram in [1,2]"},
        1,
        "vastai_query",
        "'cpu_ram in [1,2]'",
        "vastai search offers --help",
    ),
    ("vastai_query not text", {"vastai_query": 5}, 1, "vastai_query", "5", "Quote it"),
    ("vastai_ typo", {"vastai_qeury": "x"}, 1, "vastai_qeury", "'x'", "Use one of: vastai_query"),
    ("deploy absolute", {"deploy": "/etc/passwd"}, 1, "deploy", "'/etc/passwd'", "relative"),
    ("deploy parent", {"deploy": "a.py,../x"}, 1, "deploy", "'a.py,../x'", "'../x' points"),
    ("deploy not text", {"deploy": 3}, 1, "deploy", "3", "Quote it"),
]


@pytest.mark.parametrize(
    ("resources", "threads", "resource", "shown", "text"),
    [case[1:] for case in RESOURCE_ERRORS],
    ids=[case[0] for case in RESOURCE_ERRORS],
)
def test_bad_resource_names_rule_resource_value_and_fix(resources, threads, resource, shown, text):
    with pytest.raises(ResourceError) as caught:
        request(resources, threads)
    message = str(caught.value)
    assert message.startswith(f"Rule 'train': resource {resource}={shown}")
    assert " is invalid: " in message
    assert text in message
    assert message.rstrip().endswith(".")


@pytest.mark.parametrize("resources", [{}, {"gpu": 0}, {"nvidia_gpu": 0}])
def test_a_job_without_gpus_is_a_cpu_job_on_a_gpu_machine(resources):
    """Vast.ai rents only GPU machines: the search asks for one GPU, the job takes none."""
    built = request(resources)
    assert (built.num_gpus, built.gpus, built.needs().gpus) == (1, 0, 0)
    assert "num_gpus>=1" in built.offer_query()


def test_group_errors_name_the_group_and_its_rules():
    with pytest.raises(ResourceError, match=r"^Group 'g1' \(rules a, b\): resource mem_mb=-1 "):
        request_of(group_job({"mem_mb": -1}), ExecutorSettings())


# (id, option overrides, flag named, text that must appear)
SETTINGS_ERRORS = [
    (
        "unknown region",
        {"geolocation": "Europe"},
        "geolocation",
        "'Europe' is neither a region (AF, AS, EU, LC, NA, OC) nor a 2-letter country code",
    ),
    ("unknown country", {"geolocation": "DE,XX"}, "geolocation", "'XX' is not an ISO 3166-1"),
    ("empty country", {"geolocation": "DE,,PL"}, "geolocation", "e.g. EU or DE,PL"),
    ("negative disk", {"disk": -1}, "disk", f"at least {MIN_DISK_GB} GB"),
    ("disk below Vast's minimum", {"disk": 5}, "disk", "8 or more"),
    ("fractional disk", {"disk": 10.5}, "disk", "whole number"),
    ("reliability above 1", {"reliability": 1.5}, "reliability", "between 0 and 1"),
    ("reliability below 0", {"reliability": -0.1}, "reliability", "or 0 to rent from any"),
    ("order separator", {"order": "dph_total;score"}, "order", "'dph_total;score'"),
    ("order empty", {"order": ""}, "order", "e.g. dph_total"),
    ("order space", {"order": "dph total"}, "order", "comma-separated"),
    ("search_query blank", {"search_query": "cuda_vers>="}, "search-query", "blank"),
    ("search_query field", {"search_query": "foo>1"}, "search-query", "unknown offer field"),
    ("max_price 0", {"max_price": 0}, "max-price", "above 0"),
    ("max_price negative", {"max_price": -1.0}, "max-price", "omit it"),
    ("gpu_name empty", {"gpu_name": ""}, "gpu-name", "RTX_4090"),
    ("gpu_name brackets", {"gpu_name": "RTX[4090]"}, "gpu-name", "not a GPU model name"),
    ("image empty", {"image": ""}, "image", "Docker image"),
    ("image with space", {"image": "a b"}, "image", "vastai/pytorch"),
]


@pytest.mark.parametrize(
    ("options", "flag", "text"),
    [case[1:] for case in SETTINGS_ERRORS],
    ids=[case[0] for case in SETTINGS_ERRORS],
)
def test_bad_option_names_flag_value_and_fix(options, flag, text):
    with pytest.raises(SettingsError) as caught:
        validate_settings(ExecutorSettings(**options))
    message = str(caught.value)
    (value,) = options.values()
    assert message.startswith(f"Option --vastai-{flag}={value!r} is invalid: ")
    assert text in message


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"order": "dlperf_usd-,dph_total"},
        {"order": "score-"},
        {"order": "+dph"},
        {"geolocation": "eu,US", "max_price": 2, "reliability": 0, "disk": 8},
        {"search_query": "cuda_vers>=12.1 gpu_ram>=24 verified=any"},
    ],
)
def test_good_options_pass(options):
    validate_settings(ExecutorSettings(**options))


def test_request_of_checks_options_too():
    with pytest.raises(SettingsError, match="--vastai-geolocation"):
        request({}, geolocation="Mars")


SIGNATURE = Signature(
    image="img:1",
    gpu_name="RTX 4090",
    num_gpus=1,
    geolocation=("DE", "PL"),
    datacenter_only=True,
    reliability=0.98,
    extra_query="cuda_vers>=12.1",
    interruptible=False,
    max_price=0.5,
    cpu_cores=4,
    mem_gb=16.0,
    disk_gb=40,
)


@pytest.mark.parametrize(("name", "bigger"), [("cpu_cores", 8), ("mem_gb", 32.0), ("disk_gb", 100)])
def test_signature_at_least_fields(name, bigger):
    big = dataclasses.replace(SIGNATURE, **{name: bigger})
    assert big.exact_key() == SIGNATURE.exact_key()
    assert big.can_serve(SIGNATURE)
    assert not SIGNATURE.can_serve(big)
    assert SIGNATURE.can_serve(SIGNATURE)


@pytest.mark.parametrize(
    ("name", "other"),
    [
        ("image", "img:2"),
        ("geolocation", ("DE",)),
        ("geolocation", ()),
        ("datacenter_only", False),
        ("reliability", 0.9),
        ("extra_query", ""),
        ("interruptible", True),
        ("max_price", 1.0),
        ("max_price", None),
    ],
)
def test_signature_exact_fields(name, other):
    changed = dataclasses.replace(SIGNATURE, **{name: other})
    assert changed.exact_key() != SIGNATURE.exact_key()
    assert not changed.can_serve(SIGNATURE)
    assert not SIGNATURE.can_serve(changed)
    assert len({changed.exact_key(), SIGNATURE.exact_key()}) == 2  # hashable bucket keys


def test_signature_gpu_model_equal_unless_any_and_gpu_count_at_least():
    other_model = dataclasses.replace(SIGNATURE, gpu_name="RTX 3090")
    assert not other_model.can_serve(SIGNATURE) and not SIGNATURE.can_serve(other_model)
    assert SIGNATURE.can_serve(dataclasses.replace(SIGNATURE, gpu_name=None))
    more_gpus = dataclasses.replace(SIGNATURE, num_gpus=SIGNATURE.num_gpus + 1)
    assert more_gpus.can_serve(SIGNATURE) and not SIGNATURE.can_serve(more_gpus)


def test_request_signature_from_jobs():
    small = request({"mem_mb": 2000, "gpu_model": "RTX_4090"}, threads=2).signature()
    large = request(
        {"mem_mb": 8000, "disk_mb": 90_000, "gpu_model": "RTX_4090"}, threads=4
    ).signature()
    assert large.can_serve(small) and not small.can_serve(large)
    other_gpu = request({"mem_mb": 8000, "gpu_model": "RTX_3090"}, threads=4).signature()
    assert not other_gpu.can_serve(small)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DE", ("DE",)),
        (" de , PL ,de", ("DE", "PL")),
        ("NA,de", ("BM", "CA", "DE", "GL", "PM", "US")),
        ("aq", ("AQ",)),
    ],
)
def test_expand_geolocation(text, expected):
    assert expand_geolocation(text) == expected


def test_regions_cover_every_country_once_except_europe_asia():
    for name, codes in REGIONS.items():
        assert codes <= COUNTRIES, name
    assert set().union(*REGIONS.values()) == COUNTRIES - {"AQ"}
    assert REGIONS["EU"] & REGIONS["AS"] == {"AM", "AZ", "CY", "GE", "KZ", "RU", "TR"}
    others = [REGIONS[name] for name in ("AF", "LC", "NA", "OC")]
    assert sum(map(len, others)) + len(REGIONS["EU"] | REGIONS["AS"]) == len(COUNTRIES) - 1
    assert {"DE", "FR", "GB", "PL", "CH", "NO"} <= REGIONS["EU"]
    assert {"BR", "MX", "AR"} <= REGIONS["LC"] and "US" not in REGIONS["LC"]


ISO_TABLE = Path("/usr/share/zoneinfo/iso3166.tab")


@pytest.mark.skipif(not ISO_TABLE.exists(), reason="no tzdata country table here")
def test_countries_match_the_iso_table():
    lines = ISO_TABLE.read_text().splitlines()
    assert {line.split("\t")[0] for line in lines if line and not line.startswith("#")} == (
        COUNTRIES
    )


def test_importing_resources_does_not_import_the_sdk():
    """Reading a job's resources (what ``--help`` and every start do) must not pay for the
    SDK's import; the marketplace imports it when it first talks to Vast.ai."""
    module = "snakemake_executor_plugin_vastai.edge.resources"
    check = f"import sys, {module}; assert 'vastai' not in sys.modules, 'eager import'"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)


PROBE_PLUGIN = '''
"""An executor that only records what request_of makes of each real Snakemake job."""
import json, os
from pathlib import Path

from snakemake_interface_executor_plugins.executors.base import AbstractExecutor, SubmittedJobInfo
from snakemake_interface_executor_plugins.settings import CommonSettings

from snakemake_executor_plugin_vastai.edge import resources, settings

common_settings = CommonSettings(non_local_exec=True, implies_no_shared_fs=False,
                                 job_deploy_sources=False)


class Executor(AbstractExecutor):
    def run_job(self, job):
        request = resources.request_of(
            job, settings.ExecutorSettings(), {"a", "b"}.__contains__
        )
        record = {
            "is_group": job.is_group(),
            "jobid_type": type(job.jobid).__name__,
            "name": job.name,
            "rules": sorted(job.rules),
            "threads": job.threads,
            "resources": {k: v for k, v in job.resources.items() if k != "tmpdir"},
            "rule": request.rule,
            "query": request.offer_query(),
            "deploy": list(request.deploy),
            "interruptible": request.interruptible,
        }
        with open(os.environ["PROBE_OUT"], "a") as out:
            out.write(json.dumps(record) + "\\n")
        for member in job.jobs if job.is_group() else [job]:
            for path in member.output:
                Path(path).touch()
        info = SubmittedJobInfo(job=job)
        self.report_job_submission(info)
        self.report_job_success(info)

    def get_exec_mode(self):
        raise NotImplementedError()

    def handle_job_success(self, job):
        pass

    def handle_job_error(self, job):
        pass

    def cancel(self):
        pass

    def shutdown(self):
        pass
'''

SNAKEFILE = """
rule all:
    input: "train.out", "b.out"

rule train:
    output: "train.out"
    threads: 2
    resources:
        gpu=1, gpu_model="RTX_4090", mem_mb=2000, disk_mb=60000,
        vastai_query="cuda_vers>=12.1", deploy="scripts/*.py"
    shell: "exit 1"

rule a:
    output: "a.out"
    group: "g1"
    resources: mem_mb=3000
    shell: "exit 1"

rule b:
    input: "a.out"
    output: "b.out"
    group: "g1"
    threads: 3
    shell: "exit 1"
"""


def test_real_snakemake_jobs(tmp_path):
    """Real Job and GroupJob objects, with Snakemake's "full" default resources, through a
    throwaway executor plugin in a child process."""
    plugin = tmp_path / "snakemake_executor_plugin_probe"
    plugin.mkdir()
    (plugin / "__init__.py").write_text(PROBE_PLUGIN)
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(SNAKEFILE)
    out = tmp_path / "probe.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--executor",
            "probe",
            "--jobs",
            "2",
            "--quiet",
            "--default-resources",
        ],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "PROBE_OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    records = {record["name"]: record for record in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"train", "g1_a_b"}

    train = records["train"]
    assert train["is_group"] is False and train["jobid_type"] == "int"
    assert (train["rules"], train["threads"]) == (["train"], 2)
    assert train["resources"]["gpu"] == 1 and train["resources"]["mem_mb"] == 2000
    assert train["rule"] == "train"
    assert train["query"] == (
        "num_gpus>=1 gpu_name=RTX_4090 cpu_cores_effective>=2 cpu_ram>=2 disk_space>=60 "
        "reliability>=0.98 datacenter=True cuda_vers>=12.1"
    )
    assert (train["deploy"], train["interruptible"]) == (["scripts/*.py"], False)

    group = records["g1_a_b"]
    assert group["is_group"] is True and group["jobid_type"] == "str"
    assert (group["rules"], group["threads"]) == (["a", "b"], 3)
    assert group["resources"]["_cores"] == 3
    assert group["rule"] == "group g1 (rules a, b)"
    # Sequential group members: the larger mem_mb (3000) and, from --default-resources,
    # the disk_mb of a job without input (50000 MB) are what the group needs.
    assert group["query"] == (
        "num_gpus>=1 cpu_cores_effective>=3 cpu_ram>=3 disk_space>=50 reliability>=0.98 "
        "datacenter=True"
    )
    assert group["interruptible"] is True
