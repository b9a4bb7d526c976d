"""``snakemake-vastai offers``: the real command against the fake marketplace. It loads the
workflow, prices each rule's jobs, diagnoses a rule no offer can serve, estimates what the
jobs with a known runtime cost, and rents nothing. Prices are the catalogue's
(tests/fakevast/offers.json), priced for a 40 GB disk and checked by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakevast.harness import FakeVast
from tests.workflows import assert_nothing_rented, snakemake_env, write_workflow

HELPER = Path(sys.executable).with_name("snakemake-vastai")

WORKFLOW = """\
SAMPLES = ["A", "B"]

localrules: report

rule report:
    input: expand("train_{s}.txt", s=SAMPLES), expand("prep_{s}.txt", s=SAMPLES),
           "plain.txt", "huge.txt", "bad.txt"
    output: "report.txt"
    shell: "cat {input} > {output}"

rule train:
    output: "train_{s}.txt"
    threads: 16
    resources: gpu=1, gpu_model="RTX_4090", mem_mb=60000, runtime=30
    shell: "echo {wildcards.s} > {output}"

rule prep:
    output: "prep_{s}.txt"
    resources: gpu=1
    benchmark: "benchmarks/prep_{s}.tsv"
    shell: "echo {wildcards.s} > {output}"

rule plain:
    output: "plain.txt"
    resources: gpu=1
    shell: "echo plain > {output}"

rule huge:
    output: "huge.txt"
    resources: gpu=1, mem_mb=900000
    shell: "echo huge > {output}"

rule bad:
    output: "bad.txt"
    resources: gpu=-1
    shell: "echo bad > {output}"
"""
# From an earlier run: prep_A is done, and its benchmark says it took two minutes.
EARLIER_RUN = {
    "prep_A.txt": "A\n",
    "benchmarks/prep_A.tsv": "s\th:m:s\tmax_rss\n120.0\t0:02:00\t12.3\n",
}
HUGE = (
    "No offer with >= 900 GB RAM at reliability >= 0.98 (the default) from datacenters only "
    "(the default) for rule huge. With resource `mem_mb=416000` (now 900 GB): 1 offer from "
    "$3.74/h."
)


BAD = (
    "Rule 'bad': resource gpu=-1 is invalid: a GPU count must be a whole number, 0 or more. "
    "Set gpu to the number of GPUs the job uses (0 or unset: a CPU job)."
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return write_workflow(tmp_path / "wf", WORKFLOW, EARLIER_RUN)


def offers(fake: FakeVast, workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HELPER), "--api-url", fake.url, "--workdir", str(workdir), "offers", *extra],
        env=snakemake_env(fake),
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_nothing_ran(fake: FakeVast, workdir: Path) -> None:
    assert_nothing_rented(fake)
    made = {"train_A.txt", "train_B.txt", "prep_B.txt", "plain.txt", "huge.txt", "bad.txt"}
    assert not [name for name in made if (workdir / name).exists()]


def test_text(fakevast: FakeVast, workdir: Path) -> None:
    done = offers(fakevast, workdir)

    assert done.returncode == 1, done.stderr  # rule huge can rent nothing
    assert done.stderr == ""
    text = done.stdout
    assert text.startswith(
        f"6 jobs to run in 5 remote rules; offers at {fakevast.url}, first by dph_total, "
        "priced with the disk each job rents.\n"
    )
    train = section(text, "rule train: 2 jobs")
    assert train[0] == (
        "  query: num_gpus>=1 gpu_name=RTX_4090 cpu_cores_effective>=16 cpu_ram>=60 "
        "disk_space>=40 reliability>=0.98 datacenter=True"
    )
    assert train[1].split() == ["$/h", "GPU", "cores", "RAM", "GB", "region", "reliability"]
    assert train[2].split() == ["1.016", "2x", "RTX", "4090", "24", "48", "Tokyo,", "JP", "99.4%"]
    assert len(train) == 7  # query, heading, three offers, what the defaults hide, runtime
    assert train[5] == (  # 2x RTX 4090 in Bavaria, DE: a hobbyist host at 95.4%
        "  The defaults leave out 1 cheaper offer (from $0.807/h): hosts outside datacenters "
        "(--vastai-no-datacenter) and reliability below 0.98 (--vastai-reliability)."
    )
    assert train[6] == "  runtime: 60 min for 2 jobs (runtime resource), about $1.02"
    prep = section(text, "rule prep: 1 job")  # prep_A is done
    assert prep[-1] == "  runtime: 2 min for 1 job (benchmarks of earlier runs), about $0.02"
    assert section(text, "rule plain: 1 job")[-1] == "  runtime: unknown"
    assert section(text, "rule huge: 1 job")[-1] == f"  No offer. {HUGE}"
    assert section(text, "rule bad: 1 job") == [f"  Refused: {BAD}"]
    assert "rule report" not in text  # a local rule rents nothing
    assert text.endswith(
        "Estimate: $1.04 for 62 min of instance time (3 jobs with a known runtime, each alone "
        "on its rule's first offer; boots, idle time and jobs sharing an instance are not "
        "counted).\n"
        "No runtime known for plain: give the rule a `runtime` resource (minutes), or run it "
        "once with `benchmark:`.\n"
        "No offer, not priced: huge.\n"
        "Resources refused, not priced: bad.\n"
        "Nothing was rented.\n"
    )
    assert_nothing_ran(fakevast, workdir)


def section(text: str, heading: str) -> list[str]:
    """The lines under ``heading``, up to the next blank line."""
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = lines.index("", start)
    return lines[start:end]


def test_json(fakevast: FakeVast, workdir: Path) -> None:
    done = offers(fakevast, workdir, "--json")

    assert done.returncode == 1, done.stderr
    document = json.loads(done.stdout)  # one document, nothing else on stdout
    assert document["api_url"] == fakevast.url
    assert document["jobs"] == "to run"
    rules = {entry["rule"]: entry for entry in document["rules"]}
    assert {name: entry["jobs"] for name, entry in rules.items()} == {
        "bad": 1,
        "huge": 1,
        "plain": 1,
        "prep": 1,
        "train": 2,
    }
    train = rules["train"]
    assert [offer["id"] for offer in train["offers"]] == [9210012, 9210013, 9210014]
    assert train["offers"][0] == {
        "id": 9210012,
        "dph_total": pytest.approx(1.008 + 0.15 * 40 / 720),
        "gpu_name": "RTX 4090",
        "num_gpus": 2,
        "cpu_cores": 24.0,
        "cpu_ram_gb": 48.135,  # its share (24 of 32 cores) of the machine's 64.18 GB
        "disk_gb": 250.0,
        "geolocation": "Tokyo, JP",
        "reliability": 0.9938,
    }
    assert train["runtime"] == {"seconds": 3600.0, "jobs": 2, "source": "runtime resource"}
    assert train["cost_usd"] == pytest.approx(1.008 + 0.15 * 40 / 720)
    assert train["defaults_leave_out"] == {
        "offers": 1,
        "at_least": False,
        "cheapest_dph_total": pytest.approx(0.796 + 0.2 * 40 / 720),
        "options": ["--vastai-no-datacenter", "--vastai-reliability"],
        "message": "The defaults leave out 1 cheaper offer (from $0.807/h): hosts outside "
        "datacenters (--vastai-no-datacenter) and reliability below 0.98 (--vastai-reliability).",
    }
    assert rules["prep"]["runtime"]["source"] == "benchmarks of earlier runs"
    assert rules["plain"]["runtime"] is None
    huge = rules["huge"]
    assert huge["offers"] == []
    assert huge["diagnosis"]["message"] == HUGE
    assert huge["diagnosis"]["hints"][0]["change"] == "With resource `mem_mb=416000` (now 900 GB)"
    estimate = document["estimate"]
    assert estimate["jobs"] == 3
    assert estimate["instance_hours"] == pytest.approx(62 / 60)
    assert estimate["usd"] == pytest.approx(1.008 + 0.15 * 40 / 720 + (0.6 + 0.15 * 40 / 720) / 30)
    assert estimate["rules_without_runtime"] == ["plain"]
    assert estimate["rules_without_offer"] == ["huge"]
    assert estimate["rules_refused"] == ["bad"]
    assert rules["bad"]["error"] == BAD
    assert_nothing_ran(fakevast, workdir)


def test_options_and_every_job(fakevast: FakeVast, workdir: Path) -> None:
    """The query options of a run, as flags; --all prices the jobs already done too."""
    done = offers(
        fakevast,
        workdir,
        "--all",
        "--json",
        "--geolocation",
        "EU",
        "--max-price",
        "0.5",
        "--reliability",
        "0.95",
        "--no-datacenter",
    )

    document = json.loads(done.stdout)
    assert document["jobs"] == "all"
    rules = {entry["rule"]: entry for entry in document["rules"]}
    assert rules["prep"]["jobs"] == 2
    plain = rules["plain"]
    assert plain["query"].startswith("num_gpus>=1 disk_space>=40 reliability>=0.95 geolocation in")
    assert plain["query"].endswith("dph_total<=0.5")
    # Europe, at most $0.50/h, reliability >= 0.95, hobbyist hosts too: an RTX 3060 in DE.
    assert plain["offers"][0]["id"] == 9210023
    assert plain["defaults_leave_out"] is None  # both defaults changed: nothing they hide
    assert_nothing_ran(fakevast, workdir)


def test_a_bad_option_is_one_line_and_searches_nothing(fakevast: FakeVast, workdir: Path) -> None:
    done = offers(fakevast, workdir, "--geolocation", "Atlantis")

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("snakemake-vastai: Option --vastai-geolocation='Atlantis'")
    assert len(done.stderr.splitlines()) == 1
    assert "POST /api/v0/bundles/" not in fakevast.ledger()["api_calls"]
