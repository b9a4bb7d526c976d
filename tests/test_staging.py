"""staging.py: which sources and inputs may go, and how local files are hashed. (How they travel
to a real fake instance, and results back, is in test_jobwire.py.)"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastai.remote.staging import (
    MAX_SOURCE_BYTES,
    DigestCache,
    StagingError,
    expand_local,
    local_bytes,
    safe_relative,
    select_sources,
)

# -- which paths may travel -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "normal"),
    [("a/b", "a/b"), ("./a//b/", "a/b"), ("a/../b", "b"), ("..hidden", "..hidden")],
)
def test_safe_relative_normalises(path: str, normal: str) -> None:
    assert safe_relative(path) == normal


@pytest.mark.parametrize("path", ["/etc/passwd", "..", "../x", "a/../../x", "a/b/../../../x"])
def test_safe_relative_refuses_escapes(path: str) -> None:
    with pytest.raises(StagingError, match="outside the workflow directory"):
        safe_relative(path)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The workflow directory, as the cwd (staging works in workdir-relative paths)."""
    root = tmp_path / "workflow"
    root.mkdir()
    monkeypatch.chdir(root)
    return root


def make_files(root: Path, files: dict[str, bytes | int]) -> None:
    """Create files: bytes are the content, an int a sparse file of that size."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            with open(path, "wb") as handle:
                handle.truncate(content)
        else:
            path.write_bytes(content)


def test_select_sources(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_files(
        workdir,
        {
            "Snakefile": b"rule all: pass\n",
            "config/config.yaml": b"a: 1\n",
            "scripts/step.py": b"print(1)\n",
            "README.md": b"# hi\n",
            "data/table.csv": b"x\n",
            "lib/util.py": b"u = 1\n",
            "lib/sub/deep.py": b"d = 1\n",
            "extra/untracked.txt": b"named by a glob, unknown to git\n",
            "lib/huge.bin": MAX_SOURCE_BYTES + 1,
            "..dotted-name.txt": b"a file name, not a parent directory\n",
        },
    )
    shared = workdir.parent / "shared"
    make_files(shared, {"config.yaml": b"b: 2\n", "abs.yaml": b"c: 3\n"})
    # Essential files go whatever the globs say, but never from outside the workdir
    # (configfile: "../shared/config.yaml" is legal in a Snakefile).
    essential = [
        "Snakefile",
        "config/config.yaml",
        "./scripts/step.py",
        "../shared/config.yaml",
        str(shared / "abs.yaml"),
        str(workdir / "config" / "config.yaml"),  # absolute, but inside: goes (once)
    ]
    tracked = [
        "README.md",
        "data/table.csv",
        "lib/util.py",
        "lib/sub/deep.py",
        "lib/huge.bin",
        "..dotted-name.txt",
        "lib/deleted-but-tracked.py",
    ]
    with caplog.at_level(logging.WARNING):
        chosen = select_sources(essential, tracked, ["lib/", "*.md", "extra", "..dotted*"])
    assert chosen == [
        "..dotted-name.txt",
        "README.md",
        "Snakefile",
        "config/config.yaml",
        "extra/untracked.txt",
        "lib/sub/deep.py",
        "lib/util.py",
        "scripts/step.py",
    ]
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "lib/huge.bin" in warnings and "10 MB" in warnings
    for outside in ("../shared/config.yaml", "../shared/abs.yaml"):
        assert f"{outside}: it lies outside the working directory" in warnings
    assert "dotted" not in warnings


def test_select_sources_without_globs_takes_every_tracked_file(workdir: Path) -> None:
    make_files(workdir, {"Snakefile": b"", "a.txt": b"a", "d/b.txt": b"b", "big": 10**7 + 1})
    assert select_sources(["Snakefile"], ["a.txt", "d/b.txt", "big"], []) == [
        "Snakefile",
        "a.txt",
        "d/b.txt",
    ]


def test_rule_deploy_globs_add_files_but_never_narrow(workdir: Path) -> None:
    """A rule's `deploy` resource ships its globs on top of --vastai-deploy-paths (or of all
    tracked files when that is unset), including files git does not track."""
    files = {"Snakefile": b"", "a.txt": b"a", "models/m.bin": b"m", "untracked/u.txt": b"u"}
    make_files(workdir, files)
    tracked = ["a.txt", "models/m.bin"]
    assert select_sources(["Snakefile"], tracked, ["a.txt"], ["models", "untracked/*"]) == [
        "Snakefile",
        "a.txt",
        "models/m.bin",
        "untracked/u.txt",
    ]
    assert select_sources(["Snakefile"], tracked, [], ["untracked/*"]) == [
        "Snakefile",
        "a.txt",
        "models/m.bin",
        "untracked/u.txt",
    ]
    assert select_sources(["Snakefile"], tracked, ["a.txt"]) == ["Snakefile", "a.txt"]


def test_expand_local_walks_folders_and_names_missing_inputs(workdir: Path) -> None:
    make_files(workdir, {"in/a": b"a", "in/sub/b": b"b", "c": b"c"})
    assert expand_local(["in", "c", "./c"]) == ["c", "in/a", "in/sub/b"]
    assert expand_local(["in/sub/../../c"]) == ["in/sub/../../c"]  # as the job will look for it
    with pytest.raises(StagingError, match="'in/nope'"):
        expand_local(["in/nope"])
    with pytest.raises(StagingError, match="outside"):
        expand_local(["../c"])


def test_digest_cache_rehashes_a_changed_file(workdir: Path) -> None:
    cache = DigestCache()
    path = workdir / "f"
    path.write_bytes(b"one")
    assert cache.digest("f") == hashlib.sha256(b"one").hexdigest()
    path.write_bytes(b"two!")  # another size: a new key even within the mtime granularity
    assert cache.digest("f") == hashlib.sha256(b"two!").hexdigest()


def test_local_bytes_counts_files_and_the_files_under_directories(tmp_path: Path) -> None:
    """What a job would ship up: a file, a directory's files at any depth, and nothing for
    a path that does not exist (yet)."""
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "tree" / "deep").mkdir(parents=True)
    (tmp_path / "tree" / "b.bin").write_bytes(b"x" * 100)
    (tmp_path / "tree" / "deep" / "c.bin").write_bytes(b"x" * 1000)

    paths = [str(tmp_path / name) for name in ("a.bin", "tree", "missing.bin")]

    assert local_bytes(paths) == 1110
