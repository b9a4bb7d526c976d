"""Each private Snakemake internal the plugin uses, exercised against the installed Snakemake:
a release that drops or renames one fails here, by name (``snakemake_internals.py``, and the
runner's ``Workflow._rundir`` on the host)."""

from __future__ import annotations

import os
from pathlib import Path

from snakemake_executor_plugin_vastai.edge.snakemake_internals import loaded_dag, storage_providers
from tests.workflows import write_workflow

TWO_RULES = """\
localrules: all


rule all:
    input: "b.txt"


rule a:
    output: "a.txt"
    resources: gpu=1
    shell: "echo a > {output}"


rule b:
    input: "a.txt"
    output: "b.txt"
    shell: "cat {input} > {output}"
"""


def test_a_dag_is_built_without_running_a_job(tmp_path: Path) -> None:
    workdir = write_workflow(tmp_path / "wf", TWO_RULES)

    with loaded_dag(workdir, None, every_job=False) as dag:
        to_run = sorted(job.name for job in dag.needrun_jobs())
        remote = sorted(job.name for job in dag.needrun_jobs() if not job.is_local)
        registry = dag.workflow.storage_registry
        providers = storage_providers(dag.workflow)

    assert to_run == ["a", "all", "b"]
    assert remote == ["a", "b"]  # local rules as a run with this plugin has them
    assert not (workdir / "a.txt").exists() and not (workdir / "b.txt").exists()
    assert isinstance(getattr(registry, "_storages", None), dict), vars(registry)
    assert providers == ()  # no storage plugin in this workflow


def test_the_runner_can_set_where_snakemake_runs() -> None:
    """The runner on the host sets ``Workflow._rundir`` before each job (Snakemake notes the
    directory once, when its workflow module is imported; ``Workflow.rundir`` returns it).
    Imported in the runner's order: ``snakemake.workflow`` first of all is a circular import
    on some 9.x releases."""
    import snakemake.cli
    import snakemake.workflow

    assert isinstance(snakemake.workflow.Workflow._rundir, str)
    assert os.path.isabs(snakemake.workflow.Workflow._rundir)
