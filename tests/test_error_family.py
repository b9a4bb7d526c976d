"""One error family, checked: every exception class of the package derives from
``errors.PluginError``, every ``raise`` names one of them or a builtin listed here with its
reason, and a start that cannot write its state says so instead of a traceback."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pkgutil
from pathlib import Path

import paramiko
import pytest

import snakemake_executor_plugin_vastai as package
from snakemake_executor_plugin_vastai.base.errors import PluginBug, PluginError, VastaiError
from tests.fakevast.harness import FakeVast
from tests.workflows import one_rule_workflow, rented, run_snakemake

# Builtins the package may raise, and why each is not one of ours.
ALLOWED_BUILTINS = {
    ValueError: "a parse that fails; caught where it is raised and told as a family error",
    TimeoutError: "remote.py's own deadline inside a wait; turned into a RemoteError there",
    OSError: "a file that cannot be read; the callers' `except OSError` say what it was",
    NotADirectoryError: "an OSError of the staging target, named with its path",
    KeyboardInterrupt: "Snakemake's own cancel path after a signal (cancel_jobs, shutdown)",
    SystemExit: "a second signal during teardown ends the process with 128 + its number",
    paramiko.AuthenticationException: "inside remote.py's login, paramiko's own meaning",
}


def package_modules() -> list[str]:
    """Every module of the package except ``onhost/``, which runs alone on a rented machine."""
    names = [package.__name__]
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if ".onhost" not in info.name:
            names.append(info.name)
    return names


@pytest.mark.parametrize("module_name", package_modules())
def test_every_exception_class_is_of_the_family(module_name: str) -> None:
    module = importlib.import_module(module_name)
    own = [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == module_name
    ]
    assert [cls.__name__ for cls in own if not issubclass(cls, PluginError)] == []


@pytest.mark.parametrize("module_name", package_modules())
def test_every_raise_is_of_the_family_or_a_listed_builtin(module_name: str) -> None:
    module = importlib.import_module(module_name)
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    outside = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        cls = _resolve(module, raised)
        if not inspect.isclass(cls):
            continue  # a caught error raised again, or a helper that builds one
        if not issubclass(cls, PluginError) and cls not in ALLOWED_BUILTINS:
            outside.append(f"line {node.lineno}: {cls.__name__}")
    assert outside == []


def test_a_bug_is_never_caught_as_a_failure_the_user_can_act_on() -> None:
    assert not issubclass(PluginBug, VastaiError)
    assert issubclass(PluginBug, PluginError)


def _resolve(module: object, node: ast.expr) -> object:
    if isinstance(node, ast.Name):
        return vars(module).get(node.id) or getattr(builtins, node.id, None)
    if isinstance(node, ast.Attribute):
        owner = _resolve(module, node.value)
        return getattr(owner, node.attr, None) if inspect.ismodule(owner) else None
    return None


def test_a_state_directory_that_cannot_be_written_stops_the_run_with_its_path(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """An OSError at the start (here `.snakemake/vastai` is a file) is the user's to fix:
    one line naming the directory, no traceback, nothing rented."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")
    (workdir / ".snakemake").mkdir()
    (workdir / ".snakemake" / "vastai").write_text("not a directory")

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert run.returncode != 0
    assert "Cannot keep the run's state in " in run.output, run.output
    assert "Traceback" not in run.output, run.output
    assert rented(fakevast) == []
