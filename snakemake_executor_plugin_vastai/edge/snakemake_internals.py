"""Every use of Snakemake's private internals, in one place.

Why: the executor interface offers neither a workflow's storage providers nor a DAG of jobs
short of running them. Each use here is named, read defensively where it can be, and
exercised against the installed Snakemake by ``tests/test_snakemake_internals.py``, so a
Snakemake release that drops one fails there, by name, and not in a user's run. (The runner
on the host sets ``Workflow._rundir`` itself: it runs on the instance, apart from this
package, and the same test file checks that attribute.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STORAGE_MODULE_PREFIX = "snakemake_storage_plugin_"


def storage_providers(workflow: Any) -> tuple[str, ...]:
    """The storage plugins the workflow uses (the default provider, ``storage:`` directives
    and ``storage.<name>(...)`` calls), by plugin name, from the workflow's private
    ``storage_registry._storages``; none when Snakemake no longer has it."""
    registered = getattr(workflow.storage_registry, "_storages", None) or {}
    names = set()
    for provider in registered.values():
        module = type(provider).__module__.partition(".")[0]
        if module.startswith(STORAGE_MODULE_PREFIX):
            names.add(module.removeprefix(STORAGE_MODULE_PREFIX))
    return tuple(sorted(names))


@contextlib.contextmanager
def loaded_dag(workdir: Path, snakefile: str | None, every_job: bool) -> Iterator[Any]:
    """The workflow's DAG, built as ``snakemake --summary`` builds it (the API's private
    ``_workflow``, ``_executor_plugin``, ``_prepare_dag`` and ``_build_dag``), with this
    plugin as the executor so that local rules and resources are a run's. Valid inside the
    ``with``; whatever the Snakefile raises comes out as it is."""
    from snakemake.api import SnakemakeApi, resolve_snakefile
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import (
        DAGSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
    )
    from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

    output = OutputSettings(quiet={Quietness.ALL}, enable_file_logging=False)
    with contextlib.chdir(workdir), SnakemakeApi(output) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(nodes=1),
            storage_settings=StorageSettings(shared_fs_usage=frozenset()),
            snakefile=Path(resolve_snakefile(snakefile)).absolute(),
        )
        workflow_api.dag(DAGSettings(forceall=every_job))  # hands the workflow these
        workflow = workflow_api._workflow
        workflow._executor_plugin = ExecutorPluginRegistry().get_plugin("vastai")
        workflow._prepare_dag(
            forceall=every_job, ignore_incomplete=True, lock_warn_only=True, nolock=True
        )
        workflow._build_dag()
        yield workflow.dag
