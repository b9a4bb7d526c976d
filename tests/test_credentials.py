"""Credentials that reach jobs without ``--envvars`` (credentials.py): which ones go, in what
form, and that none of them lands in a create request, an instance's env or a log.

The real runs use a stand-in GCS storage plugin shipped with the workflow (a module in the
workflow directory, registered by a ``storage:`` directive and never used): the run must count a
GCS provider as in use, and no GCS server exists here. A module on the path is only found by
a job started as a fresh process, hence ``--vastai-no-runner`` there.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from snakemake_executor_plugin_vastai.remote.credentials import (
    GOOGLE_FILE,
    FileValue,
    cloud_credentials,
    forwarded_environment,
)
from snakemake_executor_plugin_vastai.remote.jobwire import JobRequest
from tests.fakevast.harness import FakeVast
from tests.workflows import JOB_LOGS, assert_all_destroyed, run_snakemake, write_workflow

AWS = {
    "AWS_ACCESS_KEY_ID": "AKIAFORWARDTEST00001",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key-4d1f7a",
    "AWS_SESSION_TOKEN": "aws-session-token-9c2e51",
    "AWS_REGION": "eu-central-1",
    "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
}


def google_key() -> str:
    return json.dumps(
        {"type": "service_account", "private_key": f"google-private-{secrets.token_hex(8)}"}
    )


# -- which variables go ----------------------------------------------------------------------


def test_cloud_credentials_are_chosen_by_name_and_local_only_ones_stay() -> None:
    environ = {
        **AWS,
        "AWS_PROFILE": "work",  # a profile the instance lacks: boto3 would fail on it
        "AWS_SHARED_CREDENTIALS_FILE": "/home/me/.aws/credentials",
        "AZURE_STORAGE_ACCOUNT": "myaccount",
        "AZURE_STORAGE_KEY": "azure-key",
        "AZURE_CLIENT_SECRET": "not-a-storage-variable",
        "AWS_SESSION_EXPIRATION": "",
        "HOME": "/home/me",
    }
    found = cloud_credentials(environ, gcs=False, home=Path("/nonexistent"))
    assert found == {**AWS, "AZURE_STORAGE_ACCOUNT": "myaccount", "AZURE_STORAGE_KEY": "azure-key"}


def test_the_google_file_goes_only_with_a_gcs_provider_in_use(tmp_path: Path) -> None:
    key = tmp_path / "key.json"
    key.write_text(google_key())
    environ = {GOOGLE_FILE: str(key), "GOOGLE_CLOUD_PROJECT": "proj"}
    without = forwarded_environment({}, ["s3"], automatic=True, environ=environ, home=tmp_path)
    assert without == {}
    with_gcs = forwarded_environment({}, ["gcs", "s3"], True, environ=environ, home=tmp_path)
    assert with_gcs == {GOOGLE_FILE: key.read_text(), "GOOGLE_CLOUD_PROJECT": "proj"}
    assert isinstance(with_gcs[GOOGLE_FILE], FileValue)


def test_gcloud_application_default_credentials_are_the_fallback(tmp_path: Path) -> None:
    adc = tmp_path / ".config" / "gcloud" / "application_default_credentials.json"
    adc.parent.mkdir(parents=True)
    adc.write_text(google_key())
    found = cloud_credentials({}, gcs=True, home=tmp_path)
    assert found == {GOOGLE_FILE: adc.read_text()}
    assert cloud_credentials({}, gcs=True, home=tmp_path / "elsewhere") == {}


def test_a_named_google_file_that_is_missing_is_skipped(tmp_path: Path) -> None:
    environ = {GOOGLE_FILE: str(tmp_path / "gone.json")}
    assert cloud_credentials(environ, gcs=True, home=tmp_path) == {}


def test_declared_variables_go_even_when_automatic_forwarding_is_off(tmp_path: Path) -> None:
    key = tmp_path / "key.json"
    key.write_text(google_key())
    environ = {**AWS, GOOGLE_FILE: str(key)}
    declared = {"MY_TOKEN": "declared-token", GOOGLE_FILE: str(key)}
    off = forwarded_environment(declared, ["gcs"], automatic=False, environ=environ)
    assert off == declared
    on = forwarded_environment(declared, ["gcs"], automatic=True, environ=environ)
    assert on == {**AWS, "MY_TOKEN": "declared-token", GOOGLE_FILE: key.read_text()}
    assert isinstance(on[GOOGLE_FILE], FileValue)  # the file, not the path only here


@contextmanager
def snakemake_records() -> Iterator[list[logging.LogRecord]]:
    """The records Snakemake's logger hands its handlers (after its filters) meanwhile."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("snakemake.logging")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_forwarded_secrets_are_masked_in_snakemake_logs_but_places_are_not() -> None:
    token = f"declared-{secrets.token_hex(6)}"
    private = f"google-private-{secrets.token_hex(6)}"
    google = FileValue(json.dumps({"private_key": private}))
    forwarded_environment({"MY_TOKEN": token}, [], automatic=True, environ=AWS)
    forwarded_environment({GOOGLE_FILE: google}, [], automatic=False, environ={})

    with snakemake_records() as records:
        logging.getLogger("snakemake.logging").warning(
            "job saw %s %s %s in %s via %s",
            token,
            AWS["AWS_SECRET_ACCESS_KEY"],
            f"key: {private}",
            AWS["AWS_REGION"],
            AWS["AWS_ENDPOINT_URL_S3"],
        )
    message = records[0].getMessage()
    assert token not in message and AWS["AWS_SECRET_ACCESS_KEY"] not in message
    assert private not in message
    assert AWS["AWS_REGION"] in message and AWS["AWS_ENDPOINT_URL_S3"] in message


def test_the_plugins_own_loggers_mask_secrets_too() -> None:
    """A parent logger's filters never see its children's records: each plugin logger
    carries the filter itself."""
    from snakemake_executor_plugin_vastai.base.logger import get_logger

    token = f"declared-{secrets.token_hex(6)}"
    forwarded_environment({"MY_TOKEN": token}, [], automatic=False, environ={})
    with snakemake_records() as records:
        get_logger("some_module_of_the_plugin").warning("job saw %s", token)
    assert [r.getMessage() for r in records] == ["job saw ***"]


def test_a_file_valued_variable_travels_as_a_file_in_the_request() -> None:
    content = google_key()
    request = JobRequest("snakemake-vastai/jobs/x", ("out.txt",), ())
    staged = SimpleNamespace(sources="0" * 64, links=())  # what start reads of a StagedJob
    env = {"PLAIN": "v", GOOGLE_FILE: FileValue(content)}
    body = json.loads(request.start(staged, env, "true", ""))  # type: ignore[arg-type]
    assert body["files"] == [[GOOGLE_FILE, content]]
    assert body["env"] == "export PLAIN=v\n"


# -- real runs -------------------------------------------------------------------------------

STAND_IN_GCS_PLUGIN = '''\
"""A stand-in for snakemake-storage-plugin-gcs: registered, never used."""

from snakemake_interface_storage_plugins.storage_object import StorageObjectRead
from snakemake_interface_storage_plugins.storage_provider import (
    StorageProviderBase,
    StorageQueryValidationResult,
)


class StorageProvider(StorageProviderBase):
    @classmethod
    def example_queries(cls):
        return []

    def rate_limiter_key(self, query, operation):
        return None

    def default_max_requests_per_second(self):
        return 1.0

    def use_rate_limiter(self):
        return False

    @classmethod
    def is_valid_query(cls, query):
        return StorageQueryValidationResult(query, False, "a stand-in accepts no query")


class StorageObject(StorageObjectRead):
    def local_suffix(self):
        raise NotImplementedError

    async def inventory(self, cache):
        raise NotImplementedError

    def get_inventory_parent(self):
        return None

    def cleanup(self):
        pass

    def exists(self):
        raise NotImplementedError

    def mtime(self):
        raise NotImplementedError

    def size(self):
        raise NotImplementedError

    def retrieve_object(self):
        raise NotImplementedError
'''

SEEN = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_KEY",
    "DECLARED_TOKEN",
    "CLI_TOKEN",
)
CREDENTIALS_SNAKEFILE = r"""
storage:
    provider="gcs",

envvars:
    "DECLARED_TOKEN",

rule all:
    input: "seen.txt", "after.txt"

rule see:
    output: "seen.txt"
    shell:
        "for v in NAMES; do printf '%s=%s\\n' $v \"$(printenv $v || true)\"; done > {output}; "
        "f=$(printenv GOOGLE_APPLICATION_CREDENTIALS || true); echo path=$f >> {output}; "
        "if [ -n \"$f\" ]; then echo mode=$(stat -c %a $f) >> {output}; "
        "echo content=$(cat $f) >> {output}; fi"

rule after:
    input: "seen.txt"
    output: "after.txt"
    shell:
        "f=$(sed -n 's/^path=//p' {input}); "
        "if [ -e \"$f\" ]; then echo present; else echo gone; fi > {output}"
""".replace("NAMES", " ".join(SEEN))


def seen(workdir: Path) -> dict[str, str]:
    lines = (workdir / "seen.txt").read_text().splitlines()
    return dict(line.partition("=")[::2] for line in lines)


def local_environment(tmp_path: Path) -> dict[str, str]:
    """What this machine holds: cloud credentials, a Google key, the declared variables."""
    key = tmp_path / "google-key.json"
    key.write_text(google_key())
    return {
        **AWS,
        "AWS_PROFILE": "only-here",
        "AZURE_STORAGE_ACCOUNT": f"account{secrets.token_hex(4)}",
        "AZURE_STORAGE_KEY": f"azure-key-{secrets.token_hex(8)}",
        GOOGLE_FILE: str(key),
        "DECLARED_TOKEN": f"declared-{secrets.token_hex(8)}",
        "CLI_TOKEN": f"cli-{secrets.token_hex(8)}",
    }


def leaked_anywhere(fake: FakeVast, workdir: Path, output: str, values: list[str]) -> list[str]:
    """Which values appear in what the fake recorded of every create, in the instances' env,
    in Snakemake's output or in any file under .snakemake (logs, the jobs' logs, the ledger)."""
    records = json.dumps(
        [[row["create_request"], row["extra_env"]] for row in fake.ledger()["instances"]]
    )
    texts = [records, output]
    texts += [p.read_text(errors="replace") for p in (workdir / ".snakemake").rglob("*.log")]
    texts += [p.read_text(errors="replace") for p in (workdir / ".snakemake").rglob("*.json*")]
    assert list((workdir / JOB_LOGS).iterdir()), "the jobs' logs are missing"
    return [value for value in values if any(value in text for text in texts)]


def secret_values(local: dict[str, str]) -> list[str]:
    google = json.loads(Path(local[GOOGLE_FILE]).read_text())
    names = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY", "CLI_TOKEN")
    return [local[name] for name in (*names, "DECLARED_TOKEN")] + [google["private_key"]]


def credentials_workflow(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The workflow whose jobs write what they see, and this machine's environment for it."""
    workdir = write_workflow(
        tmp_path / "wf",
        CREDENTIALS_SNAKEFILE,
        {"snakemake_storage_plugin_gcs/__init__.py": STAND_IN_GCS_PLUGIN},
    )
    return workdir, local_environment(tmp_path)


def test_each_credential_kind_reaches_the_job_and_no_record_or_log(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    workdir, local = credentials_workflow(tmp_path)
    run = run_snakemake(
        workdir, fakevast, "--vastai-no-runner", "--envvars", "CLI_TOKEN", env=local
    )
    assert run.ok, run.output

    job = seen(workdir)
    for name in SEEN:
        assert job[name] == ("" if name == "AWS_PROFILE" else local[name]), name
    assert job["content"] == Path(local[GOOGLE_FILE]).read_text()
    assert job["mode"] == "600"
    assert job["path"].endswith(".secret-GOOGLE_APPLICATION_CREDENTIALS")
    assert (workdir / "after.txt").read_text() == "gone\n"  # removed when its job ended
    assert len(assert_all_destroyed(fakevast, workdir)) == 1  # `after` ran where `see` did
    assert leaked_anywhere(fakevast, workdir, run.output, secret_values(local)) == []


@pytest.mark.slow
def test_no_forward_credentials_keeps_only_what_the_workflow_declares(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    workdir, local = credentials_workflow(tmp_path)
    run = run_snakemake(
        workdir,
        fakevast,
        "--vastai-no-runner",
        "--vastai-no-forward-credentials",
        "--envvars",
        "CLI_TOKEN",
        env=local,
    )
    assert run.ok, run.output

    job = seen(workdir)
    assert {name for name in SEEN if job[name]} == {"DECLARED_TOKEN", "CLI_TOKEN"}
    assert job["path"] == "" and "content" not in job
    assert_all_destroyed(fakevast, workdir)
    assert leaked_anywhere(fakevast, workdir, run.output, secret_values(local)) == []
