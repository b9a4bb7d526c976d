"""bootstrap.py on real fake instances: an image that already has this Snakemake costs one
round trip and no pip, the marker makes the next bootstrap free, and a failed install reports
pip's own words. (An image without any Python cannot be made with the fake: not tested.)"""

from __future__ import annotations

from importlib.metadata import version

import paramiko
import pytest
import snakemake

from snakemake_executor_plugin_vastai.base.errors import VastaiError
from snakemake_executor_plugin_vastai.remote.bootstrap import (
    INSTALL_FAILED,
    INSTALLED_MARKER,
    MAX_ONSTART_CHARS,
    MESSAGES,
    NO_PIP,
    NO_PYTHON,
    SCRIPT_COMMAND,
    BootstrapPlan,
    explain_failure,
    onstart_script,
)
from snakemake_executor_plugin_vastai.remote.ssh import CommandResult, RemoteHost
from snakemake_executor_plugin_vastai.remote.sshkey import RunKey
from tests.fakevast.harness import FakeVast
from tests.instances import logged_in

PIP_LOG = "/tmp/pip-calls.log"
# Offline and fast: pip decides from the installed packages and /opt/wheels alone; and every
# pip run on the instance appends to PIP_LOG, which is how we see whether pip ever ran.
PIP_SETTINGS = f"export PIP_NO_INDEX=1 PIP_LOG={PIP_LOG}\n"


def bootstrap(host: RemoteHost, plan: BootstrapPlan) -> CommandResult:
    return host.run(SCRIPT_COMMAND, timeout=120, stdin=(PIP_SETTINGS + plan.script()).encode())


def pip_log(host: RemoteHost) -> str:
    return host.run(f"cat {PIP_LOG} 2>/dev/null").stdout


def has(host: RemoteHost, path: str) -> bool:
    return host.run(f"test -e {path}").exit_code == 0


def test_image_with_this_snakemake_needs_no_pip(fakevast: FakeVast, ssh_key: paramiko.PKey) -> None:
    plan = BootstrapPlan(snakemake.__version__)
    with logged_in(fakevast, ssh_key) as instance:
        host = instance.host
        assert not has(host, plan.marker)
        first = bootstrap(host, plan)
        assert first.exit_code == 0, first.stderr
        assert pip_log(host) == ""
        assert INSTALLED_MARKER not in first.stdout
        assert has(host, plan.marker)

        again = bootstrap(host, plan)
        assert again.exit_code == 0, again.stderr
        assert pip_log(host) == ""


def test_failed_install_reports_pips_words(fakevast: FakeVast, ssh_key: paramiko.PKey) -> None:
    plan = BootstrapPlan("0.0.0.invalid")
    with logged_in(fakevast, ssh_key, image="bare/python:3.11") as instance:
        result = bootstrap(instance.host, plan)
        assert result.exit_code == INSTALL_FAILED
        assert "snakemake==0.0.0.invalid" in pip_log(instance.host)
        assert not has(instance.host, plan.marker)
    message = explain_failure(result.exit_code, result.stderr)
    assert message.startswith(MESSAGES[INSTALL_FAILED])
    assert "No matching distribution found for snakemake==0.0.0.invalid" in message


def test_pinned_packages_decide_whether_pip_runs(
    fakevast: FakeVast, ssh_key: paramiko.PKey
) -> None:
    """A pinned package (e.g. a storage plugin) that the image has at that version costs no
    pip; the same package at another version is installed."""
    installed = f"paramiko=={version('paramiko')}"
    current = BootstrapPlan(snakemake.__version__, storage_plugins=(installed,))
    stale = BootstrapPlan(snakemake.__version__, storage_plugins=("paramiko==0.0.1",))
    with logged_in(fakevast, ssh_key) as instance:
        host = instance.host
        assert bootstrap(host, current).exit_code == 0
        assert pip_log(host) == ""
        assert has(host, current.marker)

        result = bootstrap(host, stale)
        assert result.exit_code == INSTALL_FAILED  # offline, so the install itself fails
        assert "paramiko==0.0.1" in pip_log(host)
        assert "paramiko==0.0.1" in explain_failure(result.exit_code, result.stderr)


def test_marker_depends_on_version_and_package_set() -> None:
    base = BootstrapPlan("9.1.0")
    assert BootstrapPlan("9.1.0", ("a", "b")).marker == BootstrapPlan("9.1.0", ("b", "a")).marker
    markers = {
        base.marker,
        BootstrapPlan("9.2.0").marker,
        BootstrapPlan("9.1.0", ("a",)).marker,
        BootstrapPlan("9.1.0", ("a", "b")).marker,
    }
    assert len(markers) == 4


@pytest.mark.parametrize(
    ("code", "stderr", "expected"),
    [
        (NO_PYTHON, "", MESSAGES[NO_PYTHON]),
        (NO_PIP, "  \n", MESSAGES[NO_PIP]),
        (INSTALL_FAILED, "ERROR: boom\n", f"{MESSAGES[INSTALL_FAILED]}:\nERROR: boom"),
        (1, "", "the bootstrap script failed with exit code 1"),
    ],
)
def test_explain_failure(code: int, stderr: str, expected: str) -> None:
    assert explain_failure(code, stderr) == expected


def test_explain_failure_keeps_the_last_lines() -> None:
    stderr = "\n".join(f"line {n}" for n in range(100))
    tail = explain_failure(INSTALL_FAILED, stderr).split(":\n", 1)[1].splitlines()
    assert tail == [f"line {n}" for n in range(85, 100)]


def test_the_onstart_script_carries_the_watchdog_within_vasts_limit(tmp_path) -> None:
    key = RunKey.create(tmp_path, "run-1").public_line
    plan = BootstrapPlan(version("snakemake"), deadman=600, api_url="https://console.vast.ai")

    script = onstart_script(key, plan)

    assert len(script) <= MAX_ONSTART_CHARS
    assert f"watchdog-{plan.key}.py 600 https://console.vast.ai" in script
    assert "watchdog" not in onstart_script(key, BootstrapPlan("9.1.0", deadman=0))


def test_an_onstart_script_over_the_limit_is_refused_before_renting(tmp_path) -> None:
    key = RunKey.create(tmp_path, "run-1").public_line
    plan = BootstrapPlan("9.1.0", deadman=600, api_url="https://example.org/" + "x" * 3000)

    with pytest.raises(VastaiError, match=r"over Vast\.ai's limit of 4048.*--vastai-deadman 0"):
        onstart_script(key, plan)
