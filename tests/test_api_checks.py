"""The start-up check of a real ``snakemake --executor vastai`` run: a rejected key, an API URL
nobody answers at, and a URL that is not the Vast.ai API each stop the run before anything is
rented, with one message, said once, that names the thing to fix (and never the key)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakevast.harness import FakeVast
from tests.notvast import not_vast, unused_port
from tests.workflows import (
    SnakemakeRun,
    assert_nothing_rented,
    fatal_error,
    one_rule_workflow,
    run_snakemake,
)

WRONG_KEY = "not-the-fake-key-7f3a"


def start(fake: FakeVast, tmp_path: Path, *extra: str, env: dict[str, str | None]) -> SnakemakeRun:
    """A one-rule run with a HOME of its own (no key file unless the test writes one)."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    base: dict[str, str | None] = {"HOME": str(home), "XDG_CONFIG_HOME": None}
    return run_snakemake(workdir, fake, *extra, jobs=1, env=base | env)


def assert_stopped_once(run: SnakemakeRun, message: str) -> None:
    assert run.returncode != 0, run.output
    assert fatal_error(run.output) == message, run.output
    assert run.output.count(message.split(":")[0]) == 1, run.output


@pytest.mark.slow
def test_an_unreachable_api_url_names_the_network_not_the_key(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    run = start(fakevast, tmp_path, "--vastai-api-url", url, env={})
    assert_stopped_once(
        run,
        f"Cannot reach the Vast.ai API at {url}: connection refused. Check the network, or "
        "--vastai-api-url / VAST_URL. Nothing was rented.",
    )
    assert "API key" not in run.output
    assert fakevast.ledger()["api_calls"] == {}  # the run never reached the marketplace


def test_a_url_that_is_not_the_vast_api_says_so(fakevast: FakeVast, tmp_path: Path) -> None:
    with not_vast(status=404) as server:
        run = start(fakevast, tmp_path, "--vastai-api-url", server.url, env={})
    assert_stopped_once(
        run,
        f"The Vast.ai API at {server.url} sent an answer that cannot be read: HTTP 404 for the "
        f"user account. Is {server.url} the Vast.ai API? Check --vastai-api-url / VAST_URL. "
        "Nothing was rented.",
    )
    assert server.requests == ["GET /api/v0/users/current"]


ORIGINS = {
    "--vastai-api-key": "--vastai-api-key",
    "SNAKEMAKE_VASTAI_API_KEY": "SNAKEMAKE_VASTAI_API_KEY",
    "VAST_API_KEY": "VAST_API_KEY",
    "key file": "the key file {home}/.vast_api_key",
}


@pytest.mark.parametrize("origin", ORIGINS)
def test_a_rejected_key_says_so_once_and_where_it_came_from(
    fakevast: FakeVast, tmp_path: Path, origin: str
) -> None:
    extra: tuple[str, ...] = ()
    env: dict[str, str | None] = {"VAST_API_KEY": None}
    if origin == "--vastai-api-key":
        extra = (origin, WRONG_KEY)
        env = {}  # the right key in VAST_API_KEY loses to the flag
    elif origin == "key file":
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / ".vast_api_key").write_text(WRONG_KEY + "\n")
    else:
        env[origin] = WRONG_KEY

    run = start(fakevast, tmp_path, *extra, env=env)

    where = ORIGINS[origin].format(home=tmp_path / "home")
    assert_stopped_once(
        run,
        f"Vast.ai rejected the API key from {where} (HTTP 401). Check that key, or pass "
        "another with --vastai-api-key. Nothing was rented.",
    )
    assert WRONG_KEY not in run.output
    assert_nothing_rented(fakevast)
    assert fakevast.ledger()["api_calls"] == {"GET /api/v0/users/current/": 1}
