"""Which of the user's credentials go along with each job, and in what form.

Why automatic: in storage mode the job itself reads and writes the bucket, on a host that is
not ours, so it needs the credentials the local Snakemake uses; naming each in ``--envvars`` is
easy to forget and fails only on the instance. Why only in the job's request: a create
request's ``env`` and ``onstart`` show in Vast's console and API, while a job's request travels
over SSH on the agent's stdin into a 0600 env file that the job deletes once read. Why the
Google file only with a GCS storage provider in use: it is a long-lived key to a whole project,
not a variable a job may happen to read.

Whoever operates the host can read what the job can: forward scoped keys only (README).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.base.redact import hide_in_snakemake_logs

log = get_logger(__name__)

# Not AWS_PROFILE nor the *_FILE variables: they name profiles and files that only this machine
# has (boto3 fails outright on a profile it cannot find).
AWS_VARIABLES = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
    }
)
AWS_SERVICE_ENDPOINT = "AWS_ENDPOINT_URL_"  # per service, e.g. AWS_ENDPOINT_URL_S3
AZURE_PREFIX = "AZURE_STORAGE_"
GOOGLE_FILE = "GOOGLE_APPLICATION_CREDENTIALS"
GOOGLE_PROJECT = "GOOGLE_CLOUD_PROJECT"
ADC_FILE = "application_default_credentials.json"  # gcloud auth application-default login
GCS_PROVIDERS = frozenset({"gcs"})
MAX_FILE_BYTES = 64 * 1024  # a credentials file is a few KB; anything larger is no such file
# Values that say where, not who: left readable in the logs.
_PLACE = re.compile(r"(REGION|ENDPOINT_URL(_\w+)?|PROJECT)\Z")
# Fields of a Google credentials file that are secrets on their own.
_GOOGLE_SECRET_FIELDS = ("private_key", "private_key_id", "refresh_token", "client_secret")


class FileValue(str):
    """A variable the job needs as a file: this string is the file's content. The job agent
    writes it 0600 into the job's directory, points the variable at it and deletes it when
    the job ends."""


def forwarded_environment(
    declared: Mapping[str, str],
    storage_providers: Iterable[str],
    automatic: bool,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> dict[str, str]:
    """The environment every job gets: what the workflow declares (``envvars:``,
    ``--envvars``, storage plugin settings), always; and with ``automatic`` also the local
    cloud credentials (a Google file wins over a declared path, which would name a file the
    instance lacks). Each secret among them is hidden from Snakemake's log from now on."""
    env = dict(declared)
    if automatic:
        gcs = bool(GCS_PROVIDERS.intersection(storage_providers))
        env.update(cloud_credentials(os.environ if environ is None else environ, gcs, home))
    for secret in secrets(env):
        hide_in_snakemake_logs(secret)
    return env


def cloud_credentials(
    environ: Mapping[str, str], gcs: bool, home: Path | None = None
) -> dict[str, str]:
    """AWS and Azure storage variables as set here; with ``gcs``, the Google credentials
    file (as a FileValue) and project."""
    found = {
        name: value
        for name, value in environ.items()
        if value
        and (name in AWS_VARIABLES or name.startswith((AWS_SERVICE_ENDPOINT, AZURE_PREFIX)))
    }
    if gcs:
        key = google_credentials(environ, home or Path.home())
        if key is not None:
            found[GOOGLE_FILE] = key
        if environ.get(GOOGLE_PROJECT):
            found[GOOGLE_PROJECT] = environ[GOOGLE_PROJECT]
    return found


def google_credentials(environ: Mapping[str, str], home: Path) -> FileValue | None:
    """The file GOOGLE_APPLICATION_CREDENTIALS names, else gcloud's application default
    credentials, if there are any."""
    named = environ.get(GOOGLE_FILE)
    if named:
        path = Path(named).expanduser()
    else:
        path = Path(environ.get("CLOUDSDK_CONFIG") or home / ".config" / "gcloud") / ADC_FILE
        if not path.is_file():
            return None  # no Google login here: nothing to forward, nothing to warn about
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise OSError(f"larger than {MAX_FILE_BYTES} bytes")
        return FileValue(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        log.warning("The Google credentials file %s is not forwarded to jobs: %s", path, reason)
        return None


def secrets(env: Mapping[str, str]) -> Iterator[str]:
    """The values to hide: all but places (regions, endpoints, projects), and the secret
    fields of a credentials file besides the whole file."""
    for name, value in env.items():
        if _PLACE.search(name):
            continue
        yield str(value)
        if isinstance(value, FileValue):
            yield from _json_secrets(value)


def _json_secrets(text: str) -> Iterator[str]:
    try:
        document = json.loads(text)
    except ValueError:
        return
    if isinstance(document, dict):
        for field in _GOOGLE_SECRET_FIELDS:
            if isinstance(document.get(field), str):
                yield document[field]
