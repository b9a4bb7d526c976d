"""The job agent and the resident runner on real fake instances (jobwire.py, onhost/): staging
from the instance's store, starting by fork or as a plain process, the result stream and its
checks, secrets kept out of every argv, kills, dropped connections and a runner that dies."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import paramiko
import pytest
from hypothesis import given
from hypothesis import strategies as st

from snakemake_executor_plugin_vastai.base.errors import UserError
from snakemake_executor_plugin_vastai.remote.bootstrap import SCRIPT_COMMAND, BootstrapPlan
from snakemake_executor_plugin_vastai.remote.jobwire import (
    LOG_CUT_MARKER,
    LOG_HEAD_BYTES,
    LOG_TAIL_BYTES,
    MAX_RESULT_ENTRIES,
    JobExit,
    JobRequest,
    RemoteJob,
    ResultError,
    ResultFiles,
    Results,
    StreamLost,
    append_log,
    env_file,
    last_lines,
)
from snakemake_executor_plugin_vastai.remote.onhost.runner import read_env_file, snakemake_args
from snakemake_executor_plugin_vastai.remote.ssh import (
    MAX_OUTPUT_BYTES,
    HostKeyMismatch,
    RemoteHost,
)
from snakemake_executor_plugin_vastai.remote.staging import (
    REMOTE_BASE,
    DigestCache,
    InstanceFiles,
    SourceBundle,
    Stager,
    StagingError,
)
from tests.fakevast.harness import FakeVast
from tests.instances import logged_in

SNAKEFILE = r"""
rule echo_env:
    output: "out/{name}.txt"
    shell: "sleep ${{PAUSE:-0}}; printf '%s|%s|%s' \"$SECRET\" \"$PWD\" $$ > {output}"

rule family:
    output: "out/family.txt"
    shell: "sleep 1000 & sleep 1000; touch {output}"
"""


def snakemake_job(target: str) -> str:
    """A job command as Snakemake writes one: run in-process by the runner."""
    return f"python -m snakemake {target} --snakefile Snakefile --cores 1 --nolock"


@dataclass
class OnInstance:
    """A bootstrapped fake instance with its store, as a run keeps them, and ways to use it."""

    fake: FakeVast
    host: RemoteHost
    plan: BootstrapPlan
    sources: SourceBundle
    held: InstanceFiles = field(default_factory=InstanceFiles)
    digests: DigestCache = field(default_factory=DigestCache)

    def start(
        self,
        name: str,
        command: str,
        inputs: tuple[str, ...] = (),
        outputs: tuple[str, ...] = (),
        logs: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        runner: bool = True,
    ) -> Started:
        staged = Stager(self.host, self.held, self.digests).prepare(self.sources, list(inputs))
        request = JobRequest(f"{REMOTE_BASE}/jobs/{name}", outputs, logs)
        log: list[bytes] = []
        job = RemoteJob(self.host, self.plan.agent_command, request, log.append)
        prefix = self.plan.runner_prefix if runner else ""
        job.start(request.start(staged, env or {}, command, prefix))
        return Started(job, log, staged.uploaded_bytes)

    def sh(self, command: str) -> str:
        result = self.host.run(command)
        assert result.exit_code == 0, f"{command!r}: {result.stderr}"
        return result.stdout

    def exists(self, remote: str) -> bool:
        return self.host.run(f"test -e {shlex.quote(remote)}").exit_code == 0

    def bytes_up(self) -> int:
        return self.fake.ledger()["ssh_bytes"]["up"]

    def runner_pid(self) -> int:
        return int(self.sh(f"cat {self.plan.runner_prefix}.pid"))


@dataclass
class Started:
    job: RemoteJob
    log: list[bytes]
    uploaded_bytes: int

    def finish(self, digests: DigestCache, timeout: float = 60) -> tuple[JobExit, Results]:
        deadline = time.monotonic() + timeout
        while (ended := self.job.wait(0.5)) is None:
            assert time.monotonic() < deadline, "the job did not end"
        results = self.job.results(digests)
        self.job.close()
        return ended, results

    def text(self) -> str:
        return b"".join(self.log).decode()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "workflow"
    root.mkdir()
    monkeypatch.chdir(root)
    (root / "Snakefile").write_text(SNAKEFILE)
    return root


@pytest.fixture
def box(fakevast: FakeVast, ssh_key: paramiko.PKey, workdir: Path) -> Iterator[OnInstance]:
    sources = SourceBundle.build(["Snakefile"], workdir / ".snakemake" / "vastai" / "sources")
    plan = BootstrapPlan(version("snakemake"), ())
    with logged_in(fakevast, ssh_key, label="snakemake-vastai:test:jobwire") as instance:
        result = instance.host.run(SCRIPT_COMMAND, stdin=plan.script().encode(), timeout=300)
        assert result.exit_code == 0, result.stderr
        yield OnInstance(fakevast, instance.host, plan, sources)


def local_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- staging and results ----------------------------------------------------------------------


def test_a_job_gets_a_fresh_dir_and_only_what_the_store_lacks_goes_up(box: OnInstance) -> None:
    inputs = {"data/raw reads.txt": os.urandom(3000), "data/sub dir/blob.bin": os.urandom(2**21)}
    for name, content in inputs.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(content)
    box.sh(f"mkdir -p {REMOTE_BASE}/jobs/j1 && echo old > {REMOTE_BASE}/jobs/j1/stale.txt")
    listing = "sha256sum Snakefile data/*.txt 'data/sub dir/blob.bin' > sums; ls > files"
    first = box.start("j1", listing, tuple(inputs), outputs=("sums", "files"))
    assert first.uploaded_bytes == box.sources.archive.stat().st_size + sum(
        len(c) for c in inputs.values()
    )
    ended, _ = first.finish(box.digests)
    assert ended.code == 0
    sums = dict(reversed(line.split(maxsplit=1)) for line in Path("sums").read_text().splitlines())
    for name in ["Snakefile", *inputs]:
        assert sums[name] == local_sha256(name)
    assert "stale.txt" not in Path("files").read_text().split()

    before = box.bytes_up()
    second = box.start("j2", listing, tuple(inputs), outputs=("sums",))
    assert second.uploaded_bytes == 0
    assert second.finish(box.digests)[0].code == 0
    assert box.bytes_up() - before < 50_000, "inputs the store held went up again"


def test_an_output_feeds_the_next_job_without_upload(box: OnInstance) -> None:
    output = "results/step one.bin"
    maker = f"mkdir -p results && head -c 1000000 /dev/urandom > '{output}'"
    ended, results = box.start("step1", maker, outputs=(output,)).finish(box.digests)
    assert ended.code == 0 and results.downloaded_bytes == 1_000_000
    assert results.stored == [(output, local_sha256(output))]
    assert not box.exists(f"{REMOTE_BASE}/jobs/step1"), "the job dir must go after the results"
    box.held.remember(digest for _, digest in results.stored)

    before = box.bytes_up()
    reader = box.start("step2", f"sha256sum '{output}' > sum", (output,), outputs=("sum",))
    assert reader.uploaded_bytes == 0
    assert reader.finish(box.digests)[0].code == 0
    assert box.bytes_up() - before < 50_000
    assert Path("sum").read_text().split()[0] == local_sha256(output)


def test_a_directory_output_comes_back_as_a_tree(box: OnInstance) -> None:
    make = (
        "mkdir -p 'out/tree/sub dir/deeper' out/elsewhere && echo a > out/tree/a.txt && "
        "echo b > 'out/tree/sub dir/b.txt' && echo c > 'out/tree/sub dir/deeper/c.txt'"
    )
    ended, results = box.start("tree", make, outputs=("out/tree",)).finish(box.digests)
    assert ended.code == 0
    found = sorted(str(p.relative_to("out/tree")) for p in Path("out/tree").rglob("*"))
    assert found == ["a.txt", "sub dir", "sub dir/b.txt", "sub dir/deeper", "sub dir/deeper/c.txt"]
    assert Path("out/tree/sub dir/deeper/c.txt").read_text() == "c\n"
    assert results.refused == []


def test_links_inside_a_directory_output_come_back_as_links(box: OnInstance) -> None:
    """A Hugging Face cache is made of links: snapshot files point into blobs/, and a link to a
    directory (or an absolute link) inside the output is just as harmless."""
    make = (
        "mkdir -p hf/blobs hf/refs hf/snapshots/rev1/sub && echo config > hf/blobs/aaa && "
        "echo weights > hf/blobs/bbb && echo rev1 > hf/refs/main && "
        "ln -s ../../blobs/aaa hf/snapshots/rev1/config.json && "
        "ln -s ../../../blobs/bbb hf/snapshots/rev1/sub/model.bin && "
        "ln -s snapshots/rev1 hf/latest && ln -s $PWD/hf/blobs/aaa hf/absolute"
    )
    ended, results = box.start("hf", make, outputs=("hf",)).finish(box.digests)
    assert ended.code == 0
    assert results.refused == []
    links = {
        "hf/snapshots/rev1/config.json": "../../blobs/aaa",
        "hf/snapshots/rev1/sub/model.bin": "../../../blobs/bbb",
        "hf/latest": "snapshots/rev1",
        "hf/absolute": "blobs/aaa",  # relative: the instance's absolute path means nothing here
    }
    for link, target in links.items():
        assert os.readlink(link) == target, link
    assert Path("hf/latest/sub/model.bin").read_text() == "weights\n"
    assert Path("hf/absolute").read_text() == "config\n"


def test_links_leaving_a_directory_output_are_refused_by_name(box: OnInstance) -> None:
    make = (
        "mkdir -p out/tree out/elsewhere && echo a > out/tree/a.txt && "
        "ln -s ../elsewhere out/tree/dirlink && ln -s /etc/hostname out/tree/host && "
        "ln -s missing out/tree/dangling"
    )
    ended, results = box.start("escape", make, outputs=("out/tree",)).finish(box.digests)
    assert ended.code == 0
    assert {r["path"]: r["reason"] for r in results.refused} == {
        "out/tree/dirlink": "a link out of its directory output (../elsewhere)",
        "out/tree/host": "a link out of its directory output (/etc/hostname)",
        "out/tree/dangling": "a link to nothing (missing)",
    }
    assert sorted(os.listdir("out/tree")) == ["a.txt"]


def test_a_failed_job_sends_back_its_logs_only(box: OnInstance) -> None:
    command = "mkdir -p out logs && echo ok > out/made.txt && echo why > logs/j.log; exit 3"
    started = box.start("failed", command, outputs=("out/made.txt",), logs=("logs/j.log",))
    ended, results = started.finish(box.digests)
    assert ended.code == 3
    assert Path("logs/j.log").read_text() == "why\n"
    assert not Path("out/made.txt").exists(), "a failed job's outputs do not come back"
    assert results.missing == []
    assert not box.exists(f"{REMOTE_BASE}/jobs/failed")


def test_missing_outputs_are_named_and_absent_logs_are_no_error(box: OnInstance) -> None:
    command = "mkdir -p out && echo ok > out/made.txt"
    outputs = ("out/made.txt", "out/never made.txt")
    started = box.start("partial", command, outputs=outputs, logs=("logs/absent.log",))
    ended, results = started.finish(box.digests)
    assert ended.code == 0
    assert results.missing == ["out/never made.txt"]
    assert not Path("logs/absent.log").exists()


def test_hostile_outputs_are_refused_not_followed(box: OnInstance) -> None:
    """A host's output that is a link to /dev/zero or a FIFO must not make the download endless
    or hang: it is refused, named, and nothing of it lands here."""
    command = "mkdir -p out && ln -s /dev/zero out/zero.bin && mkfifo out/pipe && echo x > out/ok"
    outputs = ("out/zero.bin", "out/pipe", "out/ok")
    ended, results = box.start("hostile", command, outputs=outputs).finish(box.digests, 30)
    assert ended.code == 0
    assert {r["path"]: r["reason"] for r in results.refused} == {
        "out/zero.bin": "not a regular file (a character device)",
        "out/pipe": "not a regular file (a FIFO)",
    }
    assert sorted(os.listdir("out")) == ["ok"]


# -- the runner -------------------------------------------------------------------------------


def test_a_snakemake_job_is_forked_in_its_own_dir_with_its_own_env(box: OnInstance) -> None:
    started = box.start(
        "forked", snakemake_job("out/env.txt"), outputs=("out/env.txt",), env={"SECRET": "s1"}
    )
    ended, _ = started.finish(box.digests)
    assert ended.code == 0, started.text()
    assert started.job.runner_note == ""  # the runner forked it
    secret, cwd, _ = Path("out/env.txt").read_text().split("|")
    assert secret == "s1"
    assert cwd.endswith(f"{REMOTE_BASE}/jobs/forked")
    assert ended.cpu_seconds is not None
    learned = box.sh(f"cat {box.plan.runner_prefix}.modules").split()
    assert "snakemake.workflow" in learned
    assert not any(name.startswith("hypothesis") for name in learned)

    # The next job sees its own environment, nothing of the last one (bash: unbound variable).
    again = box.start("forked2", snakemake_job("out/env.txt"), outputs=("out/env.txt",))
    assert again.finish(box.digests)[0].code == 1
    assert "SECRET: unbound variable" in again.text()
    assert again.job.runner_note == ""


def test_jobs_forked_at_once_do_not_see_each_others_env(box: OnInstance) -> None:
    names = [f"pair{i}" for i in range(4)]
    outcomes: dict[str, str] = {}

    def one(name: str) -> None:
        started = box.start(
            name,
            snakemake_job(f"out/{name}.txt"),
            outputs=(f"out/{name}.txt",),
            env={"SECRET": f"secret of {name}", "PAUSE": "0.5"},
        )
        assert started.finish(box.digests)[0].code == 0, started.text()
        outcomes[name] = Path(f"out/{name}.txt").read_text()

    threads = [threading.Thread(target=one, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == names
    for name, text in outcomes.items():
        secret, cwd, _ = text.split("|")
        assert secret == f"secret of {name}"
        assert cwd.endswith(f"/jobs/{name}")


@pytest.mark.parametrize("runner", [True, False], ids=["forked", "plain"])
def test_secrets_appear_in_no_argv_on_the_instance(box: OnInstance, runner: bool) -> None:
    secret = "hunter2-" + os.urandom(4).hex()
    started = box.start(
        "secret",
        snakemake_job("out/env.txt"),
        outputs=("out/env.txt",),
        env={"SECRET": secret, "PAUSE": "2.5"},
        runner=runner,
    )
    job_dir = f"{REMOTE_BASE}/jobs/secret"
    deadline = time.monotonic() + 30
    while "sleep 2.5" not in box.sh("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '"):
        assert time.monotonic() < deadline, "the job never reached its shell"
        time.sleep(0.1)
    argv = box.sh("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
    assert secret not in argv
    assert not box.exists(f"{job_dir}/job.env"), "the env file outlived its reading"
    ended, _ = started.finish(box.digests)
    assert ended.code == 0 and Path("out/env.txt").read_text().startswith(secret)
    assert started.job.runner_note == ("" if runner else "the runner is turned off")


def test_a_killed_runner_leaves_its_jobs_running_and_is_revived(box: OnInstance) -> None:
    running = box.start(
        "orphan",
        snakemake_job("out/env.txt"),
        outputs=("out/env.txt",),
        env={"PAUSE": "2", "SECRET": ""},
    )
    while running.job.pid is None:
        assert running.job.wait(0.5) is None
    box.sh(f"kill -9 {box.runner_pid()}")
    ended, _ = running.finish(box.digests)
    assert ended.code == 0, "the forked job must outlive its runner"

    fallback = box.start(
        "fallback", snakemake_job("out/env.txt"), outputs=("out/env.txt",), env={"SECRET": ""}
    )
    assert fallback.finish(box.digests)[0].code == 0
    assert "not running" in fallback.job.runner_note

    revived = box.start(
        "revived", snakemake_job("out/env.txt"), outputs=("out/env.txt",), env={"SECRET": ""}
    )
    assert revived.finish(box.digests)[0].code == 0
    assert revived.job.runner_note == ""


def group_members(box: OnInstance, pgid: int) -> list[str]:
    """The live processes of a process group on the instance (read from /proc)."""
    script = (
        "for f in /proc/[0-9]*/stat; do read -r s < $f 2>/dev/null || continue; "
        'set -- ${s##*") "}; [ "$3" = ' + str(pgid) + ' ] && [ "$1" != Z ] && echo $f; done; true'
    )
    return box.sh(script).split()


def test_kill_ends_the_forked_jobs_whole_process_group(box: OnInstance) -> None:
    started = box.start("family", snakemake_job("out/family.txt"), outputs=("out/family.txt",))
    deadline = time.monotonic() + 30
    while started.job.pid is None or len(group_members(box, started.job.pid)) < 4:
        assert time.monotonic() < deadline, "the job's processes never appeared"
        started.job.wait(0.2)
    assert started.job.runner_note == ""
    started.job.kill()
    ended, _ = started.finish(box.digests)
    assert ended.code != 0  # Snakemake's own TERM handling may choose the code
    assert group_members(box, started.job.pid) == []


def test_a_dropped_connection_loses_neither_the_job_nor_its_log(box: OnInstance) -> None:
    command = "for i in $(seq 1 30); do echo line $i; sleep 0.1; done; echo done > out"
    started = box.start("dropped", command, outputs=("out",))
    while not started.log:
        assert started.job.wait(0.5) is None
    box.fake.set_faults({"cut_connections": True})
    with pytest.raises(StreamLost):
        while started.job.wait(0.5) is None:
            pass
    started.job.reattach()
    ended, _ = started.finish(box.digests)
    assert ended.code == 0
    assert started.text() == "".join(f"line {i}\n" for i in range(1, 31))
    assert Path("out").read_text() == "done\n"


def test_the_bootstrap_stops_a_runner_of_another_version(box: OnInstance) -> None:
    old = box.sh("sleep 1000 > /dev/null 2>&1 & echo $!").strip()
    box.sh(f"echo {old} > {REMOTE_BASE}/runner-0.0-old.pid")
    result = box.host.run(SCRIPT_COMMAND, stdin=box.plan.script().encode())
    assert result.exit_code == 0, result.stderr
    assert not box.exists(f"/proc/{old}/cmdline") or "sleep" not in box.sh(
        f"cat /proc/{old}/cmdline"
    )
    assert not box.exists(f"{REMOTE_BASE}/runner-0.0-old.pid")
    box.runner_pid()  # ours is still there


# -- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("python -m snakemake -s 'Snakefile' -c 1", ["-s", "Snakefile", "-c", "1"]),
        ("python3 -m snakemake --target-jobs 'a:i=1' 'b c'", ["--target-jobs", "a:i=1", "b c"]),
        ("python -m snakemake '--opt=$HOME'", ["--opt=$HOME"]),
        ("python -m snakemake --a && rm -rf x", None),
        ("FOO=1 python -m snakemake", None),
        ("python -m snakemake $HOME", None),
        ('python -m snakemake "quoted"', None),
        ("python -m snakemake --a; echo", None),
        ("python -m pip install x", None),
        ("python -m snakemake 'unclosed", None),
    ],
)  # fmt: skip
def test_only_a_plain_snakemake_command_is_run_in_process(
    command: str, args: list[str] | None
) -> None:
    assert snakemake_args(command) == args


@given(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True), st.text()))
def test_the_env_file_reads_back_what_was_written(tmp_path_factory, env: dict[str, str]) -> None:
    env = {name: value.replace("\0", "") for name, value in env.items()}
    path = tmp_path_factory.mktemp("env") / "job.env"
    path.write_text(env_file(env))
    assert read_env_file(str(path)) == env


def test_env_file_refuses_bad_names() -> None:
    with pytest.raises(UserError, match=r"BAD-NAME.*leave them out of --envvars"):
        env_file({"BAD-NAME": "x"})


def frames_for(path: str, content: bytes, sha: str | None = None) -> list[tuple[bytes, bytes]]:
    digest = sha or hashlib.sha256(content).hexdigest()
    return [
        (b"F", json.dumps({"path": path, "size": len(content), "mode": 0o644}).encode()),
        (b"D", content),
        (b"E", json.dumps({"sha256": digest}).encode()),
    ]


def test_result_files_are_checked_against_what_was_declared(workdir: Path) -> None:
    files = ResultFiles(["out/a.txt", "out/tree"], DigestCache())
    for frame in frames_for("out/a.txt", b"fine"):
        files.on_frame(*frame)
    assert Path("out/a.txt").read_bytes() == b"fine"

    for undeclared in ("out/b.txt", "out/tree/x", "../escape.txt", "/etc/passwd"):
        with pytest.raises(ResultError):
            files.on_frame(*frames_for(undeclared, b"x")[0])
    files.on_frame(b"M", json.dumps({"path": "out/tree"}).encode())
    for frame in frames_for("out/tree/x", b"inside"):
        files.on_frame(*frame)
    assert Path("out/tree/x").read_bytes() == b"inside"

    begin, data, end = frames_for("out/a.txt", b"new", sha="0" * 64)
    files.on_frame(*begin)
    files.on_frame(*data)
    with pytest.raises(ResultError, match="cut short or changed"):
        files.on_frame(*end)
    assert Path("out/a.txt").read_bytes() == b"fine", "a damaged file replaces nothing"

    files.on_frame(*begin)
    with pytest.raises(ResultError, match="more bytes"):
        files.on_frame(b"D", b"far too long")
    files.abort()
    assert sorted(p.name for p in Path("out").iterdir()) == ["a.txt", "tree"]


# -- what a host sends is bounded and checked ---------------------------------------------------


def frame(kind: bytes, payload: object) -> tuple[bytes, bytes]:
    return kind, payload if isinstance(payload, bytes) else json.dumps(payload).encode()


TREE = frame(b"M", {"path": "out/tree"})
BEGIN = frame(b"F", {"path": "out/tree/x", "size": 1, "mode": 0o644})


@pytest.mark.parametrize(
    "frames",
    [
        [frame(b"M", b"not json")],
        [frame(b"M", b"\xff")],
        [frame(b"M", [1, 2])],
        [frame(b"M", {"path": 7})],
        [TREE, frame(b"F", {"path": "out/tree/x"})],
        [TREE, frame(b"F", {"path": "out/tree/x", "size": -1})],
        [TREE, frame(b"F", {"path": "out/tree/x", "size": True})],
        [TREE, frame(b"F", {"path": "out/tree/x", "size": 1, "mode": "rw-r--r--"})],
        [TREE, BEGIN, frame(b"D", b"x"), frame(b"E", [])],
        [TREE, BEGIN, frame(b"D", b"x"), frame(b"E", {"error": None, "sha256": 1})],
        [TREE, frame(b"Y", {"path": "out/tree/x"})],
        [TREE, frame(b"R", {"path": "out/tree/x", "reason": 3})],
        [frame(b"Z", {"missing": "out/a.txt"})],
        [frame(b"Z", {"missing": [], "agent_cpu_seconds": "fast"})],
        [frame(b"Z", {"missing": ["out/never asked.txt"]})],
    ],
)
def test_a_malformed_result_frame_is_the_hosts_fault(
    workdir: Path, frames: list[tuple[bytes, bytes]]
) -> None:
    """ResultError (the host is not rented again), never a KeyError or TypeError."""
    files = ResultFiles(["out/a.txt", "out/tree"], DigestCache())
    *before, (kind, payload) = frames
    for earlier in before:
        files.on_frame(*earlier)
    with pytest.raises(ResultError, match=r"malformed|not asked"):
        if kind == b"Z":
            files.finish(payload)
        else:
            files.on_frame(kind, payload)
    files.abort()


def frames_command(frames: list[tuple[bytes, bytes]]) -> str:
    """A command that writes these frames, as a tampered agent on the instance would. It reads
    its request first, as the agent does: a command that exits before the request is sent
    fails the send instead (a race these tests are not about)."""
    data = b"".join(kind + len(payload).to_bytes(4, "big") + payload for kind, payload in frames)
    return f"cat >/dev/null; echo {base64.b64encode(data).decode()} | base64 -d"


@pytest.mark.parametrize(
    "bad",
    [
        frame(b"S", {"pid": "12"}),
        frame(b"S", {"pid": 0}),
        frame(b"S", {"pid": 12, "note": ["not", "text"]}),
        frame(b"X", {}),
        frame(b"X", {"code": "zero"}),
        frame(b"X", {"code": 0, "cpu_seconds": "1.5"}),
        frame(b"X", b'"0"'),
        frame(b"!", b"not json"),
    ],
)
def test_a_malformed_progress_frame_is_the_hosts_fault(
    box: OnInstance, bad: tuple[bytes, bytes]
) -> None:
    request = JobRequest(f"{REMOTE_BASE}/jobs/tampered", (), ())
    job = RemoteJob(box.host, frames_command([bad]), request, lambda chunk: None)
    job.start(b"{}")
    try:
        with pytest.raises(ResultError, match="malformed"):
            job.wait(60)
    finally:
        job.close()


def test_a_file_larger_than_the_free_disk_is_refused_before_a_byte_lands(workdir: Path) -> None:
    files = ResultFiles(["out/huge.bin"], DigestCache())
    size = shutil.disk_usage(workdir).free + 1
    with pytest.raises(StagingError, match=r"'out/huge.bin' is .* on the instance: more than this"):
        files.on_frame(*frame(b"F", {"path": "out/huge.bin", "size": size, "mode": 0o644}))
    assert list(workdir.rglob("*huge*")) == []


def test_a_flood_of_directories_stops_at_the_cap(workdir: Path) -> None:
    files = ResultFiles(["out/tree"], DigestCache())
    files.on_frame(*TREE)
    with pytest.raises(StagingError, match="more than 50,000 files, links and directories"):
        for number in range(2 * MAX_RESULT_ENTRIES):
            files.on_frame(*frame(b"M", {"path": f"out/tree/{number}"}))
    assert number == MAX_RESULT_ENTRIES  # the top and the one declared path's allowance


def test_links_may_not_lead_out_nor_be_written_through(workdir: Path) -> None:
    """Each link made here must stay in its directory output, resolved once all has landed (a
    chain can leave where no single link does), and nothing is written through one."""
    files = ResultFiles(["out/tree"], DigestCache())
    files.on_frame(*TREE)
    for target in ("/etc/passwd", "../../../outside", "../"):
        with pytest.raises(ResultError, match="out of bounds"):
            files.on_frame(*frame(b"Y", {"path": "out/tree/x", "target": target}))
    files.on_frame(*frame(b"Y", {"path": "out/tree/self", "target": "."}))
    files.on_frame(*frame(b"Y", {"path": "out/tree/up", "target": "self/.."}))  # out/tree/..
    with pytest.raises(ResultError, match="through a link"):
        files.on_frame(*frame(b"F", {"path": "out/tree/up/Snakefile", "size": 1, "mode": 0o644}))
    results = files.finish(json.dumps({"missing": []}).encode())
    assert results.refused == [
        {"path": "out/tree/up", "reason": "a link out of the directory output 'out/tree'"}
    ]
    assert not os.path.lexists("out/tree/up")
    assert os.readlink("out/tree/self") == "."
    assert Path("Snakefile").read_text() == SNAKEFILE


def test_a_declared_path_through_dotdot_is_there_as_written(workdir: Path) -> None:
    """Snakemake looks for 'sub/../x.txt' as written, which needs 'sub' here too."""
    files = ResultFiles(["sub/../x.txt"], DigestCache())
    for each in frames_for("sub/../x.txt", b"x"):
        files.on_frame(*each)
    files.finish(json.dumps({"missing": []}).encode())
    assert Path("sub/../x.txt").read_bytes() == b"x"


def test_the_local_log_keeps_its_head_a_marker_and_its_tail(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    megabyte = b"h" * (1024 * 1024 - 1) + b"\n"
    for _ in range(LOG_HEAD_BYTES // len(megabyte) + 2):
        append_log(log, megabyte)
    lines = [b"line %04d " % number + b"t" * 1000 + b"\n" for number in range(200)]
    for line in lines:  # small chunks after the cap: each keeps what came before it
        append_log(log, line)
    content = log.read_bytes()
    assert len(content) == LOG_HEAD_BYTES + len(LOG_CUT_MARKER) + LOG_TAIL_BYTES
    assert content[LOG_HEAD_BYTES:].startswith(LOG_CUT_MARKER)
    assert content.endswith(b"".join(lines[-60:]))
    assert last_lines(log, 2) == [line.decode().rstrip("\n") for line in lines[-2:]]


def test_a_commands_endless_output_is_kept_to_its_end(box: OnInstance) -> None:
    result = box.host.run(
        "head -c 100000000 /dev/zero; echo END; head -c 100000000 /dev/zero >&2; echo ERR >&2",
        timeout=300,
    )
    assert result.exit_code == 0
    assert len(result.stdout) <= MAX_OUTPUT_BYTES and result.stdout.endswith("\0END\n")
    assert len(result.stderr) <= MAX_OUTPUT_BYTES and result.stderr.endswith("\0ERR\n")


def test_a_changed_host_key_is_refused_at_once(box: OnInstance) -> None:
    """Another machine (or someone in between) answering for the instance: no waiting for a
    host that "might come back"; JobRun gives the instance up on this error."""
    started = box.start("pinned", "sleep 30")
    while started.job.pid is None:
        started.job.wait(0.5)
    box.host._host_key = paramiko.ECDSAKey.generate()  # as if first contact had seen another
    box.fake.set_faults({"cut_connections": True})
    with pytest.raises(StreamLost):
        while started.job.wait(0.5) is None:
            pass
    with pytest.raises(HostKeyMismatch, match="changed"):  # its own error, not "unreachable"
        started.job.reattach()
