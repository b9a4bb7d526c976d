"""Which sources go to an instance, and how a job's sources and inputs get there.

Why a content-addressed store on the instance: in a chain of small jobs on one warm instance
the next job's input is usually the previous job's output, which the instance already holds.
Every file that crosses the wire (up or down) is also kept on the instance under its SHA-256,
so a file with the same content is copied there instead of uploaded again. Sources go up once
per instance as one archive and are unpacked once; the job agent gives each job a copy in its
own directory, so nothing a previous job left behind can be mistaken for this job's output.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import tarfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from snakemake_executor_plugin_vastai.base.errors import VastaiError
from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.remote.ssh import RemoteHost

log = get_logger(__name__)

REMOTE_BASE = "snakemake-vastai"  # relative to the login user's home, for SFTP and shell alike
STORE = f"{REMOTE_BASE}/store"  # files by SHA-256 (the agent keeps the same layout)
MAX_SOURCE_BYTES = 10_000_000


class StagingError(VastaiError):
    """A file could not be shipped or fetched; the message names it."""


def local_bytes(paths: Iterable[str]) -> int:
    """What these files (and the files under these directories) weigh here: at most what a
    job ships up (the content store may spare some), for pricing an offer's bandwidth."""
    total = 0
    for path in paths:
        if os.path.isdir(path):
            for folder, _, names in os.walk(path):
                total += sum(_size(os.path.join(folder, name)) for name in names)
        else:
            total += _size(path)
    return total


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # not made yet, or gone: nothing to ship
        return 0


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
        self.remember(path, value)
        return value

    def remember(self, path: str, digest: str) -> None:
        """A digest computed elsewhere (while the file was received), so it is not hashed
        again when the file becomes the next job's input."""
        stat = os.stat(path)
        with self._lock:
            self._known[(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)] = digest


@dataclass
class InstanceFiles:
    """What one instance's store holds (or has under its upload name), so nothing is shipped
    twice."""

    digests: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _busy: dict[str, threading.Lock] = field(default_factory=dict)

    def one_at_a_time(self, key: str) -> threading.Lock:
        """A lock per stored item: jobs packed on one instance that need the same file (the
        workflow sources, a shared input) wait for one upload instead of racing it."""
        with self.lock:
            return self._busy.setdefault(key, threading.Lock())

    def remember(self, digests: Iterable[str]) -> None:
        with self.lock:
            self.digests.update(digests)


@dataclass(frozen=True)
class StagedJob:
    """What the job agent needs to build the job directory from the instance's store."""

    sources: str  # digest of the source archive
    links: tuple[tuple[str, str], ...]  # (digest, path in the job directory)
    uploaded_bytes: int
    reused_files: int
    upload_seconds: float  # spent uploading (a slow transfer is worth a line)


@dataclass(frozen=True)
class Upload:
    """One file sent to the instance's store."""

    size: int
    seconds: float


def expand_local(paths: Iterable[str]) -> list[str]:
    """Files named by paths, directories walked; a missing path is an error, not a skip. A file
    named through '..' keeps its name: the job looks for 'sub/../x' as written, so the job
    directory needs 'sub' too."""
    files = []
    for path in paths:
        rel = safe_relative(path)
        if os.path.isdir(rel):
            files.extend(
                os.path.join(root, name) for root, _, names in os.walk(rel) for name in names
            )
        elif os.path.exists(rel):
            files.append(path if os.pardir in Path(path).parts else rel)
        else:
            raise StagingError(f"input file '{path}' does not exist locally; cannot ship it")
    return sorted(set(files))


class Stager:
    """Uploads what a job needs and the instance's store lacks; the job agent does the rest
    (unpacking, the job directory) in the same round trip that starts the job."""

    def __init__(self, host: RemoteHost, held: InstanceFiles, digests: DigestCache) -> None:
        self.host = host
        self.held = held
        self.digests = digests

    def prepare(self, sources: SourceBundle, inputs: list[str]) -> StagedJob:
        uploaded = reused = 0
        seconds = 0.0
        links = []
        for local, digest in [
            (sources.archive, sources.digest),
            *((Path(p), self.digests.digest(p)) for p in expand_local(inputs)),
        ]:
            sent = self._ensure(local, digest)
            if sent is None:
                reused += 1
            else:
                uploaded += sent.size
                seconds += sent.seconds
            if local != sources.archive:
                links.append((digest, str(PurePosixPath(*local.parts))))
        return StagedJob(sources.digest, tuple(links), uploaded, reused, seconds)

    def _ensure(self, local: Path, digest: str) -> Upload | None:
        """The upload, or None when the store has the file. It goes up under an upload name
        the agent renames, so a broken upload never poses as the file."""
        with self.held.one_at_a_time(digest):
            with self.held.lock:
                if digest in self.held.digests:
                    return None
            started = time.monotonic()
            self.host.put_file(local, f"{STORE}/{digest}.partial")
            self.held.remember([digest])
            return Upload(local.stat().st_size, time.monotonic() - started)
