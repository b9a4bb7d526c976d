"""Storage mode through a real S3 server: with ``--default-storage-provider s3`` the jobs move
their data between the instance and the bucket themselves, and the plugin ships only commands
and sources.

The server is moto's, on loopback: the fake instances are processes on this machine, so they
reach it directly. Credentials and the endpoint reach the jobs the way a user's would, from the
environment (``AWS_*``), without ``--envvars``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paramiko
import pytest

from snakemake_executor_plugin_vastai.edge.snakemake_internals import storage_providers
from snakemake_executor_plugin_vastai.remote.bootstrap import (
    INSTALLED_MARKER,
    SCRIPT_COMMAND,
    BootstrapPlan,
)
from tests.fakevast.container import namespaces_available
from tests.fakevast.harness import FakeVast
from tests.instances import logged_in
from tests.test_credentials import google_key, leaked_anywhere
from tests.workflows import (
    assert_all_destroyed,
    job_started,
    run_snakemake,
    running_snakemake,
    write_workflow,
)

BUCKET = "snakemake-vastai-test"
PREFIX = f"s3://{BUCKET}/run"
STORAGE_ARGS = ("--default-storage-provider", "s3", "--default-storage-prefix", PREFIX)
BIG_BYTES = 20 * 1024 * 1024
S3_PLUGIN = "snakemake-storage-plugin-s3"

# moto's server in a process of its own (stdin is its lifeline), telling its port on stdout.
MOTO_SERVER = """\
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
"""


@dataclass
class S3:
    endpoint: str
    client: Any  # boto3's S3 client

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def objects(self) -> dict[str, str]:
        """Every key under the run's prefix with its ETag and time: what a rerun would change."""
        listed = self.client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
        return {o["Key"]: f"{o['ETag']}@{o['LastModified'].isoformat()}" for o in listed}


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """A real S3 server on loopback with an empty bucket, and this machine's AWS_* variables
    pointing at it (the runs below inherit them)."""
    import boto3

    server = subprocess.Popen(
        [sys.executable, "-c", MOTO_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        endpoint = f"http://127.0.0.1:{int(server.stdout.readline())}"
        environment = {
            "AWS_ACCESS_KEY_ID": f"AKIA{secrets.token_hex(8).upper()}",
            "AWS_SECRET_ACCESS_KEY": f"s3-secret-{secrets.token_hex(12)}",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield S3(endpoint, client)
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_the_storage_plugins_in_use_are_found_by_their_module() -> None:
    """The default provider, a tagged one and an untagged one of one plugin count once."""
    from snakemake_storage_plugin_s3 import StorageProvider

    provider = StorageProvider.__new__(StorageProvider)  # only its class matters here
    registry = SimpleNamespace(_storages={"s3": provider, "archive": provider, "x": object()})
    assert storage_providers(SimpleNamespace(storage_registry=registry)) == ("s3",)


def big_input(s3: S3) -> bytes:
    """The large input, put in the bucket directly: it never was on the plugin's way."""
    data = os.urandom(BIG_BYTES)
    s3.client.put_object(Bucket=BUCKET, Key="run/big.bin", Body=data)
    return data


# A chain (big.sha256 -> chain/1 -> chain/2 -> chain/3), a fan-out (fan/0..3) and a large
# output (copy.bin). The local rule `all` retrieves its inputs, so it names small files only.
STORAGE_SNAKEFILE = r"""
wildcard_constraints:
    n=r"\d+",
    i=r"\d+",

rule all:
    input: "chain/3.txt", expand("fan/{i}.txt", i=range(4)), "copy.sha256"

rule digest:
    input: "big.bin"
    output: "big.sha256"
    shell: "sha256sum < {input} | cut -d' ' -f1 > {output}"

rule copy:
    input: "big.bin"
    output: "copy.bin"
    shell: "cp {input} {output}"

rule copy_digest:
    input: "copy.bin"
    output: "copy.sha256"
    shell: "sha256sum < {input} | cut -d' ' -f1 > {output}"

rule chain:
    input: lambda w: "big.sha256" if w.n == "1" else f"chain/{int(w.n) - 1}.txt"
    output: "chain/{n}.txt"
    shell:
        "if [ {wildcards.n} = 2 ]; then echo CHAIN-''TWO; sleep $(printenv PAUSE || echo 0); fi; "
        "(cat {input}; echo {wildcards.n}) > {output}"

rule fan:
    input: "big.sha256"
    output: "fan/{i}.txt"
    shell:
        "echo {wildcards.i} $(cat {input}) "
        "$(printenv GOOGLE_APPLICATION_CREDENTIALS || echo no-google-file) > {output}"
"""
REMOTE_JOBS = 10
OUTPUTS = [
    "big.sha256",
    "copy.bin",
    "copy.sha256",
    *(f"chain/{n}.txt" for n in (1, 2, 3)),
    *(f"fan/{i}.txt" for i in range(4)),
]


def expected_outputs(data: bytes) -> dict[str, bytes]:
    digest = hashlib.sha256(data).hexdigest()
    chain = f"{digest}\n"
    expected = {"big.sha256": chain.encode(), "copy.bin": data, "copy.sha256": chain.encode()}
    for n in (1, 2, 3):
        chain += f"{n}\n"
        expected[f"chain/{n}.txt"] = chain.encode()
    for i in range(4):
        expected[f"fan/{i}.txt"] = f"{i} {digest} no-google-file\n".encode()
    return expected


def large_local_files(workdir: Path) -> list[Path]:
    return [p for p in workdir.rglob("*") if p.is_file() and p.stat().st_size > BIG_BYTES // 20]


@pytest.mark.slow
def test_jobs_move_their_data_through_the_bucket_not_this_machine(
    fakevast: FakeVast, s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    google = tmp_path / "google-key.json"  # set here, but no GCS provider is in use
    google.write_text(google_key())
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(google))
    data = big_input(s3)
    workdir = write_workflow(tmp_path / "wf", STORAGE_SNAKEFILE)

    run = run_snakemake(workdir, fakevast, *STORAGE_ARGS)
    assert run.ok, run.output

    for name, content in expected_outputs(data).items():
        assert s3.get(f"run/{name}") == content, name
    ledger = fakevast.ledger()
    moved = ledger["ssh_bytes"]["up"] + ledger["ssh_bytes"]["down"]
    # The data moved 80 MB between bucket and instances (big.bin read twice, copy.bin written
    # and read); over SSH went only the bootstrap, the sources, requests, logs and exit codes.
    assert moved < BIG_BYTES // 20, ledger["ssh_bytes"]
    assert large_local_files(workdir) == []
    instances = assert_all_destroyed(fakevast, workdir)
    assert len(instances) <= 2 < REMOTE_JOBS  # --jobs 2: the pool reused them
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    private_key = json.loads(google.read_text())["private_key"]
    assert leaked_anywhere(fakevast, workdir, run.output, [secret, private_key]) == []


@pytest.mark.slow
def test_a_rerun_after_ctrl_c_runs_only_the_missing_jobs(
    fakevast: FakeVast, s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C once every job but chain/2 (running) and chain/3 (waiting for it) has finished:
    the rerun, the same command, runs those two and leaves every object in the bucket as it
    was (Snakemake's own rule: a missing output is rerun, an existing one kept)."""
    data = big_input(s3)
    workdir = write_workflow(tmp_path / "wf", STORAGE_SNAKEFILE)
    done_before = [name for name in OUTPUTS if not name.startswith(("chain/2", "chain/3"))]
    monkeypatch.setenv("PAUSE", "600")

    with running_snakemake(workdir, fakevast, *STORAGE_ARGS, "--envvars", "PAUSE") as process:

        def only_chain_two_left() -> bool:
            assert process.poll() is None, (workdir / "snakemake.out").read_text()
            finished = (workdir / "snakemake.out").read_text().count("Finished jobid")
            return job_started(workdir, "CHAIN-TWO") and finished == len(done_before)

        fakevast.wait_for(only_chain_two_left, timeout=300, interval=0.5)
        kept = s3.objects()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) != 0
    assert sorted(kept) == sorted(["run/big.bin", *(f"run/{n}" for n in done_before)])
    assert_all_destroyed(fakevast, workdir)

    monkeypatch.setenv("PAUSE", "0")
    rerun = run_snakemake(workdir, fakevast, *STORAGE_ARGS, "--envvars", "PAUSE")
    assert rerun.ok, rerun.output

    after = s3.objects()
    assert {key: after[key] for key in kept} == kept
    assert rerun.output.count("Finished jobid") == 3  # chain/2, chain/3 and the local `all`
    for name, content in expected_outputs(data).items():
        assert s3.get(f"run/{name}") == content, name


@pytest.mark.slow
@pytest.mark.skipif(not namespaces_available(), reason="needs isolated fake instances (root)")
def test_the_bootstrap_installs_a_missing_storage_plugin_pinned_once(
    fakevast: FakeVast, ssh_key: paramiko.PKey
) -> None:
    """The fake's images share this machine's packages, so the plugin is hidden first (in the
    instance's copy-on-write view only); pip then fetches this version from PyPI."""
    from importlib.metadata import version

    plan = BootstrapPlan(version("snakemake"), (f"{S3_PLUGIN}=={version(S3_PLUGIN)}",))
    locate = (
        "import importlib.metadata as m, snakemake_storage_plugin_s3 as p; "
        f"print(p.__path__[0]); print(m.distribution('{S3_PLUGIN}')._path)"
    )
    ask_version = f"import importlib.metadata as m; print(m.version('{S3_PLUGIN}'))"
    with logged_in(fakevast, ssh_key) as instance:
        host = instance.host
        python = "python3"  # what the bootstrap picks on this image
        found = host.run(f"{python} -c {shlex.quote(locate)}")
        assert found.exit_code == 0, found.stderr
        hidden = host.run("rm -rf " + " ".join(shlex.quote(p) for p in found.stdout.split()))
        assert hidden.exit_code == 0, hidden.stderr
        assert host.run(f"{python} -c {shlex.quote(ask_version)}").exit_code != 0

        logged = "export PIP_LOG=/tmp/pip-calls.log\n"
        first = host.run(SCRIPT_COMMAND, timeout=600, stdin=(logged + plan.script()).encode())
        assert first.exit_code == 0, first.stderr
        assert INSTALLED_MARKER in first.stdout.splitlines()  # the pool says what it installed
        assert host.run(f"{python} -c {shlex.quote(ask_version)}").stdout.strip() == version(
            S3_PLUGIN
        )
        pip_runs = host.run("cat /tmp/pip-calls.log").stdout.count(f"{S3_PLUGIN}==")
        assert pip_runs >= 1

        again = host.run(SCRIPT_COMMAND, timeout=600, stdin=(logged + plan.script()).encode())
        assert again.exit_code == 0, again.stderr
        assert INSTALLED_MARKER not in again.stdout
        assert host.run("cat /tmp/pip-calls.log").stdout.count(f"{S3_PLUGIN}==") == pip_runs
