"""What goes up to an instance and what comes back, into a fresh directory per job.

Why a content-addressed store on the instance: in a chain of small jobs on one warm instance
the next job's input is usually the previous job's output, which the instance already holds.
Every file that crosses the wire (up or down) is also kept on the instance under its SHA-256,
so a file with the same content is copied there instead of uploaded again. Sources go up once
per instance as one archive and are unpacked once; each job gets a copy in its own directory,
so nothing a previous job left behind can be mistaken for this job's output.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shlex
import tarfile
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from snakemake_executor_plugin_vastai.errors import VastaiError
from snakemake_executor_plugin_vastai.logger import get_logger
from snakemake_executor_plugin_vastai.remote import RemoteHost

log = get_logger(__name__)

REMOTE_BASE = "snakemake-vastai"  # relative to the login user's home, for SFTP and shell alike
MAX_SOURCE_BYTES = 10_000_000


class StagingError(VastaiError):
    """A file could not be shipped or fetched; the message names it."""


def _outside(normal: str) -> bool:
    """Whether a normalised path leaves the working directory: absolute, or up through '..'
    (a name that merely starts with dots, like '..notes', stays inside)."""
    return os.path.isabs(normal) or normal == os.pardir or normal.startswith(os.pardir + os.sep)


def safe_relative(path: str) -> str:
    """The normalised relative path, or an error for anything that could escape the workdir."""
    normal = os.path.normpath(path)
    if _outside(normal):
        raise StagingError(
            f"'{path}' lies outside the workflow directory; only paths below it can be "
            "shipped to or fetched from an instance"
        )
    return normal


def select_sources(
    essential: Iterable[str],
    tracked: Iterable[str],
    deploy_globs: Iterable[str],
    rule_globs: Iterable[str] = (),
) -> list[str]:
    """The source files to ship: the essential ones always, the others filtered by the globs.

    Essential: Snakefile and includes, config files, scripts/notebooks and their folders,
    conda env files. The others (git-tracked files) go only when no ``deploy_globs`` is given
    (--vastai-deploy-paths), or when they match one; a glob naming a folder takes everything
    below it. ``rule_globs`` (rules' ``deploy`` resources) only add files, never narrow.
    """
    globs = [g.rstrip("/") for g in deploy_globs if g.strip()]
    extra = [g.rstrip("/") for g in rule_globs if g.strip()]

    def wanted(path: str) -> bool:
        return not globs or any(fnmatch.fnmatch(path, g) or path.startswith(g + "/") for g in globs)

    def normal(path: str) -> str:
        # Absolute paths become relative, so one inside the workdir still goes and one outside
        # it is recognised as such below.
        return os.path.normpath(os.path.relpath(path) if os.path.isabs(path) else path)

    chosen: set[str] = set()
    for path in essential:
        chosen.add(normal(path))
    for path in tracked:
        if wanted(path):
            chosen.add(normal(path))
    for path in tracked:
        if any(fnmatch.fnmatch(path, g) or path.startswith(g + "/") for g in extra):
            chosen.add(normal(path))
    for pattern in globs + extra:  # globs may also name files git does not track
        chosen.update(str(p) for p in Path().glob(pattern) if p.is_file())
        if Path(pattern).is_dir():
            chosen.update(str(p) for p in Path(pattern).rglob("*") if p.is_file())

    shipped = []
    for path in sorted(chosen):
        if _outside(path):
            log.warning("Not shipping source %s: it lies outside the working directory", path)
        elif not os.path.isfile(path):
            continue
        elif os.path.getsize(path) > MAX_SOURCE_BYTES:
            log.warning(
                "Not shipping source %s (%d bytes > 10 MB); declare it as a rule input instead",
                path,
                os.path.getsize(path),
            )
        else:
            shipped.append(path)
    return shipped


@dataclass(frozen=True)
class SourceBundle:
    """The workflow sources packed once per run; its digest names it on every instance."""

    archive: Path
    digest: str
    files: tuple[str, ...]

    @classmethod
    def build(cls, files: list[str], directory: Path) -> SourceBundle:
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / "sources.tar.gz.partial"
        with tarfile.open(partial, "w:gz") as archive:
            for path in files:
                archive.add(path, arcname=path, recursive=False)
        digest = file_digest(partial)
        final = directory / f"sources-{digest[:16]}.tar.gz"
        partial.replace(final)
        return cls(archive=final, digest=digest, files=tuple(files))


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class DigestCache:
    """SHA-256 of local files, remembered by (size, mtime) so a run hashes each file once."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def digest(self, path: str) -> str:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._known:
                return self._known[key]
        value = file_digest(Path(path))
        with self._lock:
            self._known[key] = value
        return value


@dataclass
class InstanceFiles:
    """What one instance already holds, so nothing is shipped twice."""

    digests: set[str] = field(default_factory=set)
    unpacked_sources: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _busy: dict[str, threading.Lock] = field(default_factory=dict)

    def one_at_a_time(self, key: str) -> threading.Lock:
        """A lock per stored item: jobs packed on one instance that need the same file (the
        workflow sources, a shared input) wait for one upload instead of racing it."""
        with self.lock:
            return self._busy.setdefault(key, threading.Lock())


@dataclass
class TransferReport:
    uploaded_bytes: int = 0
    reused_files: int = 0
    downloaded_bytes: int = 0


def expand_local(paths: Iterable[str]) -> list[str]:
    """Files named by paths, directories walked; a missing path is an error, not a skip."""
    files = []
    for path in paths:
        rel = safe_relative(path)
        if os.path.isdir(rel):
            files.extend(
                os.path.join(root, name) for root, _, names in os.walk(rel) for name in names
            )
        elif os.path.exists(rel):
            files.append(rel)
        else:
            raise StagingError(f"input file '{path}' does not exist locally; cannot ship it")
    return sorted(set(files))


class Stager:
    """Ships one job's sources and inputs up, and its results back down."""

    def __init__(self, host: RemoteHost, held: InstanceFiles, digests: DigestCache) -> None:
        self.host = host
        self.held = held
        self.digests = digests

    def prepare(self, job_dir: str, sources: SourceBundle, inputs: list[str]) -> TransferReport:
        """Fill a fresh ``job_dir`` with the sources and the inputs, uploading only what the
        instance does not hold yet."""
        report = TransferReport()
        self._ensure_sources(sources, report)
        plan = []
        for path in expand_local(inputs):
            digest = self.digests.digest(path)
            self._ensure_blob(Path(path), digest, report)
            plan.append((path, digest))
        script = [
            "set -e",
            f"rm -rf {q(job_dir)}",
            f"mkdir -p {q(job_dir)}",
            f"cp -a {q(self._source_dir(sources.digest))}/. {q(job_dir)}/",
        ]
        for path, digest in plan:
            target = f"{job_dir}/{PurePosixPath(*Path(path).parts)}"
            script.append(f"mkdir -p {q(str(PurePosixPath(target).parent))}")
            script.append(f"cp {q(self._blob(digest))} {q(target)}")
        self._run("\n".join(script), "prepare the job directory")
        return report

    def fetch(self, job_dir: str, outputs: list[str], optional: set[str]) -> TransferReport:
        """Bring back outputs, logs and benchmarks. A required path missing remotely fails the
        job naming it; ``optional`` paths (logs of a failed job) are fetched when present."""
        report = TransferReport()
        kinds = self._remote_kinds(job_dir, outputs)
        missing = [p for p in outputs if kinds.get(p) is None and p not in optional]
        # With an output missing the job failed: still bring back what explains it (its logs)
        # and still clear the job directory, which holds the job's secrets.
        present = [p for p in outputs if p in kinds and (not missing or p in optional)]
        registered = []
        for path in present:
            kind = kinds[path]
            local = Path(safe_relative(path))
            remote = f"{job_dir}/{path}"
            if kind == "dir":
                self.host.get_tree(remote, local)
                fetched = [Path(p) for p in expand_local([str(local)])]
            else:
                local.parent.mkdir(parents=True, exist_ok=True)
                self.host.get_file(remote, local)
                fetched = [local]
            for file in fetched:
                report.downloaded_bytes += file.stat().st_size
                digest = self.digests.digest(str(file))
                remote_file = f"{job_dir}/{PurePosixPath(*file.parts)}"
                registered.append((remote_file, digest))
        self._remember(registered, job_dir)
        if missing:
            raise StagingError(
                "the job finished but did not create "
                + ", ".join(f"'{p}'" for p in missing)
                + " on the instance"
            )
        return report

    # -- the instance's store ------------------------------------------------------------

    def _ensure_sources(self, sources: SourceBundle, report: TransferReport) -> None:
        with self.held.one_at_a_time(f"sources:{sources.digest}"):
            self._unpack_sources(sources, report)

    def _unpack_sources(self, sources: SourceBundle, report: TransferReport) -> None:
        with self.held.lock:
            if sources.digest in self.held.unpacked_sources:
                return
        self._ensure_blob(sources.archive, sources.digest, report)
        directory = self._source_dir(sources.digest)
        self._run(
            f"set -e\nrm -rf {q(directory)}.tmp\nmkdir -p {q(directory)}.tmp\n"
            f"tar -xzf {q(self._blob(sources.digest))} -C {q(directory)}.tmp\n"
            f"rm -rf {q(directory)}\nmv {q(directory)}.tmp {q(directory)}",
            "unpack the workflow sources",
        )
        with self.held.lock:
            self.held.unpacked_sources.add(sources.digest)

    def _ensure_blob(self, local: Path, digest: str, report: TransferReport) -> None:
        with self.held.one_at_a_time(digest):
            self._store_blob(local, digest, report)

    def _store_blob(self, local: Path, digest: str, report: TransferReport) -> None:
        with self.held.lock:
            if digest in self.held.digests:
                report.reused_files += 1
                return
        partial = f"{self._blob(digest)}.partial"
        self.host.put_file(local, partial)
        self._run(f"mv {q(partial)} {q(self._blob(digest))}", "store an uploaded file")
        report.uploaded_bytes += local.stat().st_size
        with self.held.lock:
            self.held.digests.add(digest)

    def _remember(self, files: list[tuple[str, str]], job_dir: str) -> None:
        """Keep fetched outputs in the store (hard links survive the job directory), then
        remove the job directory: its env file holds the job's secrets."""
        # Linked beside the store, then renamed into it: a rename is atomic, so packed jobs
        # that fetched equal files never trip over each other.
        tmp = f".{uuid.uuid4().hex}"
        lines = [
            f"ln -f {q(remote)} {q(self._blob(digest) + tmp)} && "
            f"mv -f {q(self._blob(digest) + tmp)} {q(self._blob(digest))}"
            for remote, digest in files
        ]
        self._run("\n".join([*lines, f"rm -rf {q(job_dir)}"]), "remember fetched outputs")
        with self.held.lock:
            self.held.digests.update(digest for _, digest in files)

    def _remote_kinds(self, job_dir: str, paths: list[str]) -> dict[str, str]:
        """One round trip telling, for every path, whether it is a file, a directory or absent."""
        if not paths:
            return {}
        checks = [
            f"if [ -d {q(job_dir + '/' + p)} ]; then echo dir; "
            f"elif [ -e {q(job_dir + '/' + p)} ]; then echo file; else echo none; fi"
            for p in (safe_relative(p) for p in paths)
        ]
        out = self._run("\n".join(checks), "look for the job's outputs")
        answers = out.split()
        return {p: a for p, a in zip(paths, answers, strict=True) if a != "none"}

    def _run(self, script: str, what: str) -> str:
        result = self.host.run(script)
        if result.exit_code != 0:
            raise StagingError(f"could not {what} on the instance: {result.stderr.strip()}")
        return result.stdout

    @staticmethod
    def _blob(digest: str) -> str:
        return f"{REMOTE_BASE}/store/{digest}"

    @staticmethod
    def _source_dir(digest: str) -> str:
        return f"{REMOTE_BASE}/sources/{digest[:16]}"


def q(text: str) -> str:
    return shlex.quote(text)
