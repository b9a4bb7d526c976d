"""staging.py: which sources go, and how sources, inputs and outputs travel to and from a real
fake instance over SSH, with the instance's content-addressed store saving every re-upload."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from snakemake_executor_plugin_vastai.remote import RemoteHost
from snakemake_executor_plugin_vastai.staging import (
    MAX_SOURCE_BYTES,
    REMOTE_BASE,
    DigestCache,
    InstanceFiles,
    SourceBundle,
    Stager,
    StagingError,
    expand_local,
    safe_relative,
    select_sources,
)
from tests.fakevast.harness import FakeVast
from tests.instances import logged_in

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


# -- shipping to a real instance -----------------------------------------------------------------

INPUTS = {"data/raw reads.txt": os.urandom(3000), "data/sub dir/big blob.bin": os.urandom(2**21)}
INPUT_BYTES = sum(len(content) for content in INPUTS.values())


def job_dir(name: str) -> str:
    return f"{REMOTE_BASE}/jobs/{name}"


@dataclass
class Staged:
    """One instance with its store, as the executor keeps them, plus ways to look at it."""

    fake: FakeVast
    host: RemoteHost
    sources: SourceBundle
    held: InstanceFiles
    digests: DigestCache

    def stager(self) -> Stager:
        """A new Stager per job over the same store, as each job run makes one."""
        return Stager(self.host, self.held, self.digests)

    def sh(self, command: str) -> str:
        result = self.host.run(command)
        assert result.exit_code == 0, f"{command!r}: {result.stderr}"
        return result.stdout

    def sha256(self, remote: str) -> str:
        return self.sh(f"sha256sum '{remote}'").split()[0]

    def exists(self, remote: str) -> bool:
        return self.host.run(f"test -e '{remote}'").exit_code == 0

    def bytes_up(self) -> int:
        return self.fake.ledger()["ssh_bytes"]["up"]


@pytest.fixture
def staged(fakevast: FakeVast, ssh_key: paramiko.PKey, workdir: Path) -> Iterator[Staged]:
    make_files(workdir, {"Snakefile": b"rule all: pass\n", "scripts/s.py": b"x = 1\n", **INPUTS})
    files = select_sources(["Snakefile", "scripts/s.py"], [], [])
    sources = SourceBundle.build(files, workdir / ".snakemake" / "vastai" / "sources")
    with logged_in(fakevast, ssh_key, label="snakemake-vastai:test:staging") as instance:
        yield Staged(fakevast, instance.host, sources, InstanceFiles(), DigestCache())


def local_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_prepare_fills_a_fresh_job_dir(staged: Staged) -> None:
    staged.sh(f"mkdir -p {job_dir('j1')} && echo old > {job_dir('j1')}/stale.txt")
    report = staged.stager().prepare(job_dir("j1"), staged.sources, list(INPUTS))
    assert report.uploaded_bytes == staged.sources.archive.stat().st_size + INPUT_BYTES
    assert report.reused_files == 0
    for name in [*INPUTS, "Snakefile", "scripts/s.py"]:
        assert staged.sha256(f"{job_dir('j1')}/{name}") == local_sha256(name)
    assert not staged.exists(f"{job_dir('j1')}/stale.txt")


def test_second_prepare_uploads_nothing(staged: Staged) -> None:
    staged.stager().prepare(job_dir("j1"), staged.sources, list(INPUTS))
    before = staged.bytes_up()
    report = staged.stager().prepare(job_dir("j2"), staged.sources, list(INPUTS))
    assert report.uploaded_bytes == 0
    assert report.reused_files == len(INPUTS)
    sent = staged.bytes_up() - before
    assert sent < INPUT_BYTES / 20, f"{sent} bytes went up for inputs already there"
    for name in [*INPUTS, "Snakefile"]:
        assert staged.sha256(f"{job_dir('j2')}/{name}") == local_sha256(name)


def test_fetched_output_feeds_the_next_job_without_upload(staged: Staged) -> None:
    first, output = job_dir("step1"), "results/step one.bin"
    staged.stager().prepare(first, staged.sources, ["data/raw reads.txt"])
    staged.sh(f"cd {first} && mkdir -p results && head -c 1000000 /dev/urandom > '{output}'")
    remote_sha = staged.sha256(f"{first}/{output}")

    fetched = staged.stager().fetch(first, [output], optional=set())
    assert fetched.downloaded_bytes == 1_000_000
    assert local_sha256(output) == remote_sha
    assert not staged.exists(first), "the job dir (and its env file) must go after fetch"

    before = staged.bytes_up()
    report = staged.stager().prepare(job_dir("step2"), staged.sources, [output])
    assert report.uploaded_bytes == 0 and report.reused_files == 1
    assert staged.bytes_up() - before < 50_000
    assert staged.sha256(f"{job_dir('step2')}/{output}") == remote_sha


def test_directory_output_comes_back_as_a_tree(staged: Staged) -> None:
    job = job_dir("tree")
    staged.stager().prepare(job, staged.sources, [])
    staged.sh(
        f"cd {job} && mkdir -p 'out/tree/sub dir/deeper' && echo a > out/tree/a.txt && "
        "echo b > 'out/tree/sub dir/b.txt' && echo c > 'out/tree/sub dir/deeper/c.txt'"
    )
    staged.stager().fetch(job, ["out/tree"], optional=set())
    found = sorted(str(p.relative_to("out/tree")) for p in Path("out/tree").rglob("*"))
    assert found == ["a.txt", "sub dir", "sub dir/b.txt", "sub dir/deeper", "sub dir/deeper/c.txt"]
    assert Path("out/tree/sub dir/deeper/c.txt").read_text() == "c\n"
    assert not staged.exists(job)

    report = staged.stager().prepare(job_dir("after-tree"), staged.sources, ["out/tree"])
    assert report.uploaded_bytes == 0 and report.reused_files == 3


def test_missing_required_output_is_named(staged: Staged) -> None:
    """The job ran but did not make one output: the error names it, the job's log still comes
    back for the user to read, and the job dir (with the job's secrets) is still removed."""
    job = job_dir("partial")
    staged.stager().prepare(job, staged.sources, [])
    staged.sh(f"cd {job} && mkdir -p out logs && echo ok > out/made.txt && echo why > logs/j.log")
    wanted = ["out/made.txt", "out/never made.txt", "logs/j.log", "logs/absent.log"]
    optional = {"logs/j.log", "logs/absent.log"}
    with pytest.raises(StagingError) as caught:
        staged.stager().fetch(job, wanted, optional)
    message = str(caught.value)
    assert "'out/never made.txt'" in message
    assert "made.txt'" not in message.replace("never made.txt'", "")
    assert "log" not in message
    assert Path("logs/j.log").read_text() == "why\n"
    assert not Path("out/made.txt").exists(), "a failed job's outputs do not come back"
    assert not staged.exists(job)


def test_absent_optional_outputs_are_no_error(staged: Staged) -> None:
    job = job_dir("failed")
    staged.stager().prepare(job, staged.sources, [])
    report = staged.stager().fetch(job, ["logs/absent.log"], optional={"logs/absent.log"})
    assert report.downloaded_bytes == 0
    assert not Path("logs/absent.log").exists()
    assert not staged.exists(job)
