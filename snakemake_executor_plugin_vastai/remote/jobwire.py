"""The local end of the job agent (``onhost/agent.py``): one SSH exec per job carries the job's
request up on stdin and brings back, as frames, its start, its log as it grows, its exit code
and its result files.

Why this shape: a warm job's cost is round trips, and with a 50 ms link each one counts. One
exec stages and starts the job and reports its end by a blocking wait (no polling on either
side), and the results follow on the same stream. A lost connection loses nothing: the job runs
detached on the instance, and ``attach`` asks a new agent to pick it up where the log left off.

The host is a third party, so every frame is checked: its kind, size and fields (a malformed
one is the host's fault), a file's path against the declared outputs, its length against what
was announced, and what it costs here: the disk it takes, the number of files, the size of the
local log. The SHA-256 a host announces is its own, so it only catches a file cut short or
changed while it was read, not a host that lies; what lands here is trusted only to be
declared, bounded and a regular file (or a link that stays inside its directory output).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from snakemake_executor_plugin_vastai.base.errors import HostError, UserError, VastaiError
from snakemake_executor_plugin_vastai.base.report import human_bytes
from snakemake_executor_plugin_vastai.remote.credentials import FileValue
from snakemake_executor_plugin_vastai.remote.ssh import ExecStream, RemoteError, RemoteHost
from snakemake_executor_plugin_vastai.remote.staging import (
    DigestCache,
    StagedJob,
    StagingError,
    safe_relative,
)

HEADER_BYTES = 5  # kind (1) + payload length (4, big-endian)
MAX_FRAME_BYTES = 4 * 1024 * 1024  # the agent sends at most 256 KiB of file or log per frame
READ_BYTES = 1024 * 1024
RESULT_SILENCE_SECONDS = 120.0  # no byte of the results for this long: the stream is dead
ATTACH_RECONNECT_SECONDS = 5.0  # one attach attempt's reconnect budget; the caller retries
# Files, links and directories one job may send back (beyond the paths it declared): each is a
# local inode and a few frames, and a directory output could otherwise receive them for ever.
MAX_RESULT_ENTRIES = 50_000
DISK_RESERVE_BYTES = 100_000_000  # a result never leaves less free here (Snakemake's own)
MAX_REASON_CHARS = 300  # of a refusal's reason, which the host writes and a message quotes
MAX_NAMED = 10  # outputs named in one message; the others are counted
# The local job log keeps the first LOG_HEAD_BYTES of the output and, after a marker, the last
# LOG_TAIL_BYTES (where a failure's last lines are): a host cannot fill this disk with it.
LOG_HEAD_BYTES = 32 * 1024 * 1024
LOG_TAIL_BYTES = 64 * 1024
LOG_CUT_MARKER = (
    f"\n[snakemake-vastai: the job's output passed {LOG_HEAD_BYTES >> 20} MiB; only its last "
    f"{LOG_TAIL_BYTES >> 10} KiB are kept below]\n"
).encode()
_LOG_TAIL_START = LOG_HEAD_BYTES + len(LOG_CUT_MARKER)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class AgentFailed(HostError):
    """The agent on the instance reported that it could not stage, start or watch the job."""


class StreamLost(RemoteError):
    """The job's stream ended before its results: the connection dropped (reattach)."""


class ResultError(HostError):
    """The host broke the protocol: a malformed frame, a path not declared, a wrong length or
    digest. No honest agent does that, so the host is not rented again."""


def env_file(env: dict[str, str]) -> str:
    """The job's environment as ``export`` lines; the runner and /bin/sh both read them."""
    _check_names(env)
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


def _check_names(names: Iterable[str]) -> None:
    bad = [name for name in names if not _ENV_NAME.match(name)]
    if bad:
        raise UserError(
            f"cannot pass these environment variables to the instance, their names are not "
            f"shell names (letters, digits, _): {bad}; leave them out of --envvars"
        )


_REQUIRED: Any = object()  # the default of a field that must be there


@dataclass(frozen=True)
class Fields:
    """A frame's JSON object, read field by field with its type checked: whatever else a host
    sends is a ResultError (its fault), never a KeyError or TypeError here."""

    kind: bytes
    values: dict[str, Any]

    @classmethod
    def parse(cls, kind: bytes, payload: bytes) -> Fields:
        try:
            values = json.loads(payload)
        except ValueError:  # not JSON, or not UTF-8
            values = None
        if not isinstance(values, dict):
            raise ResultError(f"the agent sent a malformed {kind!r} frame (not a JSON object)")
        return cls(kind, values)

    def text(self, name: str, default: Any = _REQUIRED) -> str:
        return self._typed(name, (str,), default)

    def integer(self, name: str, minimum: int | None = None, default: Any = _REQUIRED) -> int:
        value = self._typed(name, (int,), default)
        if minimum is not None and value < minimum:
            raise self._malformed(name, value)
        return value

    def number(self, name: str) -> float | None:
        """An optional number (a CPU time the agent may not know)."""
        return self._typed(name, (int, float), default=None)

    def flag(self, name: str) -> bool:
        return self._typed(name, (bool,), default=False)

    def texts(self, name: str) -> list[str]:
        values = self._typed(name, (list,), default=[])
        if not all(isinstance(value, str) for value in values):
            raise self._malformed(name, values)
        return values

    def _typed(self, name: str, types: tuple[type, ...], default: Any = _REQUIRED) -> Any:
        value = self.values.get(name)
        if value is None and default is not _REQUIRED:
            return default
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise self._malformed(name, value)
        return value

    def _malformed(self, name: str, value: object) -> ResultError:
        shown = repr(value)[:60]
        return ResultError(f"the agent sent a malformed {self.kind!r} frame ({name}: {shown})")


def name_some(items: list[str]) -> str:
    """The first MAX_NAMED items, and how many more there are."""
    more = len(items) - MAX_NAMED
    return ", ".join(items[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


def append_log(path: Path, chunk: bytes) -> None:
    """Add a chunk of the job's output to its local log, which never grows past the first
    LOG_HEAD_BYTES, the marker and the latest LOG_TAIL_BYTES, whatever the host sends."""
    with open(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+b") as log:
        size = log.seek(0, os.SEEK_END)
        if size <= LOG_HEAD_BYTES:  # the marker is not there yet
            room = LOG_HEAD_BYTES - size
            log.write(chunk[:room])
            chunk = chunk[room:]
            if not chunk:
                return
            log.write(LOG_CUT_MARKER)
            size = _LOG_TAIL_START
        earlier = b""
        if len(chunk) < LOG_TAIL_BYTES:  # keep what the chunk does not replace
            log.seek(max(_LOG_TAIL_START, size - (LOG_TAIL_BYTES - len(chunk))))
            earlier = log.read()
        log.seek(_LOG_TAIL_START)
        log.write((earlier + chunk)[-LOG_TAIL_BYTES:])
        log.truncate()


def last_lines(path: Path, count: int) -> list[str]:
    """The last lines of a local job log, read from its end only (it may be LOG_HEAD_BYTES)."""
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            return log.read().decode(errors="replace").splitlines()[-count:]
    except FileNotFoundError:
        return []


# The remote Snakemake's own lines around a failed job, which the local Snakemake prints itself
# (the rule's header and error block for the job, the shutdown once for the whole run).
SHUTDOWN_LINE = "Shutting down, this might take some time."
_TIMESTAMP = re.compile(r"\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\]")
_RULE_HEADER = re.compile(r"(local)?(rule|checkpoint) \S+:")
_ERROR_HEADER = re.compile(r"Error in (rule|group) \S+:?")


def own_error(lines: list[str], count: int) -> list[str]:
    """The last ``count`` lines of what the job itself said in its remote Snakemake's log
    (its command's output, Snakemake's report of its failure), without what the local
    Snakemake prints anyway: a user reads the job's error once, not every job's copy of the
    remote shutdown. The log file keeps everything."""
    start, end = _after_last_header(lines), _shutdown_at(lines)
    return _without_blocks(lines[start:end], _ERROR_HEADER)[-count:]


def _shutdown_at(lines: list[str]) -> int:
    """Where the remote Snakemake's shutdown begins (the end, when it did not shut down)."""
    for index in range(len(lines) - 1, -1, -1):
        if lines[index] == SHUTDOWN_LINE:
            return index
    return len(lines)


def _after_last_header(lines: list[str]) -> int:
    """Where the last rule's header block (``localrule x:`` and its indented fields) ends;
    0 when the job failed before any rule started (its whole log is its error)."""
    starts = [i for i, line in enumerate(lines) if _RULE_HEADER.fullmatch(line)]
    if not starts:
        return 0
    end = starts[-1] + 1
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    return end


def _without_blocks(lines: list[str], header: re.Pattern[str]) -> list[str]:
    """The lines without each block that opens with ``header``: the header, the timestamp
    just before it and the indented lines after it."""
    kept: list[str] = []
    inside = False
    for line in lines:
        if header.fullmatch(line):
            if kept and _TIMESTAMP.fullmatch(kept[-1]):
                kept.pop()
            inside = True
        elif not (inside and line.startswith((" ", "\t"))):
            inside = False
            kept.append(line)
    return kept


# How a job's log says that a file was missing: the C library's words (cat, bash, Python's
# OSError) and Python's exception, whose message may be the library's own ("x not found").
_MISSING_MARKERS = ("No such file or directory", "FileNotFoundError")
_QUOTED = re.compile(r"'([^'\n]+)'|\"([^\"\n]+)\"")
_WORD = re.compile(r"[^\s'\":,\[\]()]+")


def missing_paths(lines: list[str], job_dir: str) -> list[str]:
    """The words that may name a missing file on the lines of a job's log that report one
    ("No such file or directory: 'x'", "cat: x: No such file or directory"), as paths
    relative to the workflow directory, once each; the caller tells which exist here. An
    absolute path counts only inside the job's directory ``job_dir`` on the host."""
    found: list[str] = []
    for line in lines:
        if not any(marker in line for marker in _MISSING_MARKERS):
            continue
        quoted = [a or b for a, b in _QUOTED.findall(line)]
        for word in [*quoted, *_WORD.findall(_QUOTED.sub(" ", line))]:
            path = _in_job_dir(word, job_dir)
            if path is not None and path not in found:
                found.append(path)
    return found


def _in_job_dir(word: str, job_dir: str) -> str | None:
    """``word`` as a normalised path relative to the job's directory, or None."""
    if os.path.isabs(word):
        _, inside, tail = word.partition(f"/{job_dir}/")
        if not inside:
            return None
        word = tail
    normal = os.path.normpath(word)
    outside = normal in (os.curdir, os.pardir) or normal.startswith(os.pardir + os.sep)
    return None if outside else normal


@dataclass(frozen=True)
class JobRequest:
    """What the agent must know about one job (the start adds its files and command)."""

    job_dir: str
    outputs: tuple[str, ...]
    logs: tuple[str, ...]

    def start(self, staged: StagedJob, env: dict[str, str], command: str, runner: str) -> bytes:
        """A FileValue in ``env`` goes as a file: the agent writes it (0600) into the job's
        directory and sets the variable to its path."""
        files = {name: str(value) for name, value in env.items() if isinstance(value, FileValue)}
        _check_names(files)
        return self._encode(
            mode="start",
            sources=staged.sources,
            links=[list(link) for link in staged.links],
            env=env_file({name: value for name, value in env.items() if name not in files}),
            files=sorted(files.items()),
            command=command,
            runner=runner,
        )

    def attach(self, pid: int | None, log_offset: int) -> bytes:
        return self._encode(mode="attach", pid=pid, log_offset=log_offset)

    def _encode(self, **fields: Any) -> bytes:
        body = {
            "job_dir": self.job_dir,
            "outputs": self.outputs,
            "logs": self.logs,
            "max_entries": MAX_RESULT_ENTRIES,
            **fields,
        }
        return json.dumps(body).encode()


@dataclass(frozen=True)
class JobExit:
    code: int
    cpu_seconds: float | None  # the job's processes on the instance, when known


@dataclass
class Results:
    """What came back: files written here, and what the agent kept in the instance's store."""

    stored: list[tuple[str, str]] = field(default_factory=list)  # (path, digest)
    missing: list[str] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    downloaded_bytes: int = 0
    agent_cpu_seconds: float | None = None


class FrameReader:
    """Frames from a stream, each read whole; a deadline that passes mid-frame keeps the part."""

    def __init__(self, stream: ExecStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    def next(self, timeout: float) -> tuple[bytes, bytes] | None:
        """(kind, payload), or None when no whole frame came within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._take()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                chunk = self.stream.read(READ_BYTES, remaining)
            except TimeoutError:
                return None
            if not chunk:
                raise self._ended()
            self._buffer += chunk

    def _ended(self) -> VastaiError | RemoteError:
        """Why the stream ended before the agent said it was done."""
        name = self.stream.host_name
        if self.stream.lost:
            return StreamLost(f"{name}: the connection dropped")
        errors = self.stream.errors()
        return AgentFailed(
            f"{name}: the job agent stopped early" + (f": {errors[-2000:]}" if errors else "")
        )

    def _take(self) -> tuple[bytes, bytes] | None:
        if len(self._buffer) < HEADER_BYTES:
            return None
        size = int.from_bytes(self._buffer[1:HEADER_BYTES], "big")
        if size > MAX_FRAME_BYTES:
            raise ResultError(f"the agent sent a frame of {size} bytes (at most {MAX_FRAME_BYTES})")
        if len(self._buffer) < HEADER_BYTES + size:
            return None
        kind = bytes(self._buffer[:1])
        payload = bytes(self._buffer[HEADER_BYTES : HEADER_BYTES + size])
        del self._buffer[: HEADER_BYTES + size]
        return kind, payload


@dataclass
class _Incoming:
    """The file being received: written under a partial name, renamed into place when whole."""

    path: str
    left: int
    mode: int
    partial: Path
    handle: BinaryIO
    sha256: Any  # hashlib's running digest


class ResultFiles:
    """Writes what the agent sends: each file under a partial name that is renamed into place
    only once it is complete and its digest matches, a link inside a directory output as a
    link. Never more than MAX_RESULT_ENTRIES entries, nor a file this disk has no room for."""

    def __init__(self, wanted: list[str], digests: DigestCache) -> None:
        self.declared = list(wanted)
        self.wanted = {safe_relative(path) for path in wanted}
        self.digests = digests
        self.trees: set[str] = set()  # wanted paths the agent announced as directories
        self.links: dict[str, str] = {}  # each link made here -> its directory output
        self.entries = 0
        self.results = Results()
        self._file: _Incoming | None = None

    def on_frame(self, kind: bytes, payload: bytes) -> None:
        handlers = {
            b"M": self._directory,
            b"F": self._begin,
            b"D": self._data,
            b"E": self._end,
            b"Y": self._link,
            b"R": self._refused,
        }
        handler = handlers.get(kind)
        if handler is None:
            raise ResultError(f"the agent sent an unexpected frame {kind!r} among the results")
        handler(payload)

    def finish(self, payload: bytes) -> Results:
        if self._file is not None:
            raise ResultError(f"the results ended inside '{self._file.path}'")
        done = Fields.parse(b"Z", payload)
        missing = done.texts("missing")
        undeclared = [path for path in missing if path not in self.declared]
        if undeclared:
            raise ResultError(f"the instance called '{undeclared[0]}' missing; it was not asked")
        self.results.missing = missing
        self.results.agent_cpu_seconds = done.number("agent_cpu_seconds")
        self._check_links()
        self._make_reachable()
        return self.results

    def abort(self) -> None:
        """Drop a half-received file (the stream broke; a new agent sends it again)."""
        if self._file is not None:
            self._file.handle.close()
            self._file.partial.unlink(missing_ok=True)
            self._file = None

    def _allowed(self, path: str) -> str:
        """The path, if the job declared it (or it lies in a declared directory)."""
        try:
            normal = safe_relative(path)
        except StagingError:
            raise ResultError(f"the instance sent '{path}', outside the workflow") from None
        if normal in self.wanted or any(_inside(normal, top) for top in self.trees):
            return normal
        raise ResultError(f"the instance sent '{path}', which the job did not declare")

    def _entry(self, path: str) -> str:
        """The path of one more file, link or directory: declared, not below a link made here
        (nothing is written through one), and within MAX_RESULT_ENTRIES."""
        normal = self._allowed(path)
        self.entries += 1
        if self.entries > MAX_RESULT_ENTRIES + len(self.wanted):
            raise StagingError(
                f"the job sent back more than {MAX_RESULT_ENTRIES:,} files, links and "
                f"directories (the last: '{normal}'); pack them into one archive and declare "
                "that as the output"
            )
        parts = normal.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in self.links:
                raise ResultError(f"the instance sent '{path}' through a link")
        return normal

    def _directory(self, payload: bytes) -> None:
        path = self._entry(Fields.parse(b"M", payload).text("path"))
        if path in self.wanted:
            self.trees.add(path)
        Path(path).mkdir(parents=True, exist_ok=True)

    def _begin(self, payload: bytes) -> None:
        meta = Fields.parse(b"F", payload)
        path = self._entry(meta.text("path"))
        size = meta.integer("size", minimum=0)
        mode = stat.S_IMODE(meta.integer("mode", default=0o644)) & 0o777
        if self._file is not None:
            raise ResultError(f"the instance began '{path}' inside '{self._file.path}'")
        local = Path(path)
        free = _free_bytes(local)
        if size > free - DISK_RESERVE_BYTES:
            raise StagingError(
                f"'{path}' is {human_bytes(size)} on the instance: more than this machine has "
                f"room for ({human_bytes(free)} free, of which {human_bytes(DISK_RESERVE_BYTES)} "
                "stay free)"
            )
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
        handle = open(partial, "wb")  # noqa: SIM115 (closed in _end or abort)
        self._file = _Incoming(path, size, mode, partial, handle, hashlib.sha256())

    def _data(self, payload: bytes) -> None:
        current = self._file
        if current is None or len(payload) > current.left:
            raise ResultError("the instance sent more bytes than it announced")
        current.handle.write(payload)
        current.sha256.update(payload)
        current.left -= len(payload)

    def _end(self, payload: bytes) -> None:
        current = self._file
        if current is None:
            raise ResultError("the instance ended a file it never began")
        meta = Fields.parse(b"E", payload)
        if "error" in meta.values:  # the agent gave up on this file (it shrank while being read)
            self._refuse(current.path, meta.text("error"))
            self.abort()
            return
        digest = current.sha256.hexdigest()
        if current.left or meta.text("sha256") != digest:
            self.abort()
            raise ResultError(f"'{current.path}' arrived cut short or changed (length or SHA-256)")
        stored = meta.flag("stored")  # the instance keeps it in its store for the next job
        current.handle.close()
        os.chmod(current.partial, current.mode or 0o644)
        os.replace(current.partial, current.path)
        self.digests.remember(current.path, digest)
        self.results.downloaded_bytes += os.path.getsize(current.path)
        if stored:
            self.results.stored.append((current.path, digest))
        self._file = None

    def _link(self, payload: bytes) -> None:
        """A link inside a directory output is made here as a link (a Hugging Face cache is
        made of them), if its target stays in that directory; _check_links checks it again,
        resolved, once everything has landed."""
        meta = Fields.parse(b"Y", payload)
        path = self._entry(meta.text("path"))
        target = meta.text("target")
        top = next((tree for tree in self.trees if _inside(path, tree) and path != tree), None)
        lands = os.path.normpath(os.path.join(os.path.dirname(path), target))
        if top is None or os.path.isabs(target) or not _inside(lands, top):
            raise ResultError(f"the instance sent '{path}' as a link to '{target}', out of bounds")
        if os.path.isdir(path) and not os.path.islink(path):
            raise ResultError(f"the instance sent '{path}' as a directory and as a link")
        partial = Path(path).with_name(f".{Path(path).name}.{uuid.uuid4().hex[:8]}.link")
        os.symlink(target, partial)
        os.replace(partial, path)
        self.links[path] = top

    def _refused(self, payload: bytes) -> None:
        """A declared path the agent would not send, and why (a FIFO, a link out)."""
        meta = Fields.parse(b"R", payload)
        path = meta.text("path")
        self._entry(path)
        self._refuse(path, meta.text("reason"))

    def _refuse(self, path: str, reason: str) -> None:
        self.results.refused.append({"path": path, "reason": reason[:MAX_REASON_CHARS]})

    def _check_links(self) -> None:
        """Each link made here, resolved now that everything has landed, must end at something
        inside its directory output (a chain of links can leave where no single link does):
        any other is removed and refused by name."""
        for link, top in self.links.items():
            if not os.path.islink(link):
                continue  # a file sent later under the same name replaced it
            try:
                resolved = os.path.realpath(link, strict=True)
            except OSError:
                reason = "a link to nothing here"
            else:
                inside = _inside(resolved, os.path.realpath(top))
                reason = "" if inside else f"a link out of the directory output '{top}'"
            if reason:
                os.unlink(link)
                self._refuse(link, reason)

    def _make_reachable(self) -> None:
        """Snakemake looks for a declared path as written: 'sub/../x.txt' needs 'sub' here,
        as on the instance (and in a local run), though the file itself lands at 'x.txt'."""
        for declared in self.declared:
            if os.pardir in declared.split("/") and os.path.lexists(safe_relative(declared)):
                os.makedirs(os.path.dirname(declared), exist_ok=True)


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _free_bytes(path: Path) -> int:
    """Free space on the disk where path would land (its nearest existing folder's)."""
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


class RemoteJob:
    """One job on one instance, as its agent reports it: started, running, ended, fetched."""

    def __init__(
        self,
        host: RemoteHost,
        agent_command: str,
        request: JobRequest,
        on_log: Callable[[bytes], None],
    ) -> None:
        self.host = host
        self.agent_command = agent_command
        self.request = request
        self.on_log = on_log
        self.pid: int | None = None
        self.runner_note = ""  # why the runner did not start it, when it did not
        self.exit: JobExit | None = None
        self.log_bytes = 0
        self._reader: FrameReader | None = None

    def start(self, payload: bytes) -> None:
        self._open(payload, reconnect_timeout=None)

    def reattach(self) -> None:
        """Ask a new agent for the job's end and results (the old stream is gone)."""
        self._open(self.request.attach(self.pid, self.log_bytes), ATTACH_RECONNECT_SECONDS)

    def wait(self, timeout: float) -> JobExit | None:
        """The job's exit, or None if it did not come within timeout."""
        deadline = time.monotonic() + timeout
        while self.exit is None:
            frame = self._next(max(0.0, deadline - time.monotonic()))
            if frame is None:
                return None
            self._on_progress(*frame)
        return self.exit

    def results(self, digests: DigestCache) -> Results:
        """Receive the result files (after the exit: the outputs and logs if it succeeded, the
        logs only if not). A silent stream for RESULT_SILENCE_SECONDS is an error."""
        assert self.exit is not None
        wanted = [*self.request.outputs, *self.request.logs]
        files = ResultFiles(wanted if self.exit.code == 0 else list(self.request.logs), digests)
        try:
            while True:
                frame = self._next(RESULT_SILENCE_SECONDS)
                if frame is None:
                    raise RemoteError(f"{self.host.name}: the job's results stopped coming")
                kind, payload = frame
                if kind == b"Z":
                    return files.finish(payload)
                if kind in (b"L", b"K", b"X", b"S"):  # a re-attached agent repeats these
                    self._on_progress(kind, payload)
                else:
                    files.on_frame(kind, payload)
        except BaseException:
            files.abort()
            raise

    def kill(self) -> None:
        """End the job's process group (its agent then reports the exit as usual)."""
        if self.pid is not None:
            self.host.kill_group(self.request.job_dir, self.pid)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.stream.close()
            self._reader = None

    def _open(self, payload: bytes, reconnect_timeout: float | None) -> None:
        self.close()
        stream = self.host.open_stream(
            self.agent_command, payload, reconnect_timeout or self.host.reconnect_timeout
        )
        self._reader = FrameReader(stream)

    def _next(self, timeout: float) -> tuple[bytes, bytes] | None:
        if self._reader is None:
            raise StreamLost(f"{self.host.name}: no stream to the job")
        try:
            frame = self._reader.next(timeout)
        except BaseException:
            self.close()
            raise
        if frame is not None and frame[0] == b"!":
            self.close()
            message = Fields.parse(b"!", frame[1]).text("message", default="no reason given")
            raise AgentFailed(f"{self.host.name}: {message[:MAX_REASON_CHARS]}")
        return frame

    def _on_progress(self, kind: bytes, payload: bytes) -> None:
        if kind == b"L":
            self.on_log(payload)
            self.log_bytes += len(payload)
        elif kind == b"S":
            started = Fields.parse(kind, payload)
            self.pid = started.integer("pid", minimum=1)
            note = started.text("note", default="")[:MAX_REASON_CHARS]
            self.runner_note = "" if started.flag("runner") else note
        elif kind == b"X":
            ended = Fields.parse(kind, payload)
            self.exit = JobExit(ended.integer("code"), ended.number("cpu_seconds"))
        elif kind != b"K":
            raise ResultError(f"the agent sent an unexpected frame {kind!r} before the exit")
