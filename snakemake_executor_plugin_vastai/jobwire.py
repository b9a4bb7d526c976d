"""The local end of the job agent (``onhost/agent.py``): one SSH exec per job carries the job's
request up on stdin and brings back, as frames, its start, its log as it grows, its exit code
and its result files.

Why this shape: a warm job's cost is round trips, and with a 50 ms link each one counts. One
exec stages and starts the job and reports its end by a blocking wait (no polling on either
side), and the results follow on the same stream. A lost connection loses nothing: the job runs
detached on the instance, and ``attach`` asks a new agent to pick it up where the log left off.

The host is a third party, so every frame is checked: its kind and size, a file's path against
the declared outputs, its length and its SHA-256 against what was announced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snakemake_executor_plugin_vastai.credentials import FileValue
from snakemake_executor_plugin_vastai.errors import VastaiError
from snakemake_executor_plugin_vastai.remote import ExecStream, RemoteError, RemoteHost
from snakemake_executor_plugin_vastai.staging import (
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

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class AgentFailed(VastaiError):
    """The agent on the instance reported that it could not stage, start or watch the job."""


class StreamLost(RemoteError):
    """The job's stream ended before its results: the connection dropped (reattach)."""


class ResultError(VastaiError):
    """The results broke a rule: a path not declared, a wrong length or digest."""


def env_file(env: dict[str, str]) -> str:
    """The job's environment as ``export`` lines; the runner and /bin/sh both read them."""
    _check_names(env)
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


def _check_names(names: Iterable[str]) -> None:
    bad = [name for name in names if not _ENV_NAME.match(name)]
    if bad:
        raise ValueError(f"invalid environment variable names: {bad}")


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
        body = {"job_dir": self.job_dir, "outputs": self.outputs, "logs": self.logs, **fields}
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


class ResultFiles:
    """Writes the files the agent sends, each to a partial file that is renamed into place only
    once it is complete and its digest matches."""

    def __init__(self, wanted: list[str], digests: DigestCache) -> None:
        self.wanted = {safe_relative(path) for path in wanted}
        self.digests = digests
        self.trees: set[str] = set()  # wanted paths the agent announced as directories
        self.results = Results()
        self._file: dict[str, Any] | None = None

    def on_frame(self, kind: bytes, payload: bytes) -> None:
        handlers = {b"M": self._directory, b"F": self._begin, b"D": self._data, b"E": self._end}
        handler = handlers.get(kind)
        if handler is None:
            raise ResultError(f"the agent sent an unexpected frame {kind!r} among the results")
        handler(payload)

    def finish(self, payload: bytes) -> Results:
        if self._file is not None:
            raise ResultError(f"the results ended inside '{self._file['path']}'")
        done = json.loads(payload)
        self.results.missing = [str(p) for p in done.get("missing", [])]
        self.results.refused = [
            {"path": str(r.get("path")), "reason": str(r.get("reason"))}
            for r in done.get("refused", [])
        ]
        self.results.stored = [(str(p), str(d)) for p, d in done.get("stored", [])]
        self.results.agent_cpu_seconds = done.get("agent_cpu_seconds")
        return self.results

    def abort(self) -> None:
        """Drop a half-received file (the stream broke; a new agent sends it again)."""
        if self._file is not None:
            self._file["handle"].close()
            Path(self._file["partial"]).unlink(missing_ok=True)
            self._file = None

    def _allowed(self, path: object) -> str:
        """The path, if the job declared it (or it lies in a declared directory)."""
        try:
            normal = safe_relative(str(path))
        except StagingError:
            raise ResultError(f"the instance sent '{path}', outside the workflow") from None
        if normal in self.wanted or any(normal.startswith(top + "/") for top in self.trees):
            return normal
        raise ResultError(f"the instance sent '{path}', which the job did not declare")

    def _directory(self, payload: bytes) -> None:
        path = self._allowed(json.loads(payload)["path"])
        if path in self.wanted:
            self.trees.add(path)
        Path(path).mkdir(parents=True, exist_ok=True)

    def _begin(self, payload: bytes) -> None:
        meta = json.loads(payload)
        path = self._allowed(meta["path"])
        size = meta["size"]
        if not isinstance(size, int) or size < 0 or self._file is not None:
            raise ResultError(f"the instance announced '{path}' badly")
        local = Path(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
        self._file = {
            "path": path,
            "left": size,
            "mode": stat.S_IMODE(int(meta.get("mode", 0o644))) & 0o777,
            "partial": partial,
            "handle": open(partial, "wb"),  # noqa: SIM115 (closed in _end or abort)
            "sha256": hashlib.sha256(),
        }

    def _data(self, payload: bytes) -> None:
        current = self._file
        if current is None or len(payload) > current["left"]:
            raise ResultError("the instance sent more bytes than it announced")
        current["handle"].write(payload)
        current["sha256"].update(payload)
        current["left"] -= len(payload)

    def _end(self, payload: bytes) -> None:
        current, meta = self._file, json.loads(payload)
        if current is None:
            raise ResultError("the instance ended a file it never began")
        if "error" in meta:  # the agent gave up on this file (it shrank while being read)
            self.results.refused.append({"path": current["path"], "reason": str(meta["error"])})
            self.abort()
            return
        digest = current["sha256"].hexdigest()
        if current["left"] or meta.get("sha256") != digest:
            self.abort()
            raise ResultError(f"'{current['path']}' arrived damaged (length or SHA-256 differ)")
        current["handle"].close()
        os.chmod(current["partial"], current["mode"] or 0o644)
        os.replace(current["partial"], current["path"])
        self.digests.remember(current["path"], digest)
        self.results.downloaded_bytes += os.path.getsize(current["path"])
        self._file = None


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
            raise AgentFailed(f"{self.host.name}: {json.loads(frame[1]).get('message')}")
        return frame

    def _on_progress(self, kind: bytes, payload: bytes) -> None:
        if kind == b"L":
            self.on_log(payload)
            self.log_bytes += len(payload)
        elif kind == b"S":
            started = json.loads(payload)
            self.pid = int(started["pid"])
            self.runner_note = "" if started.get("runner") else str(started.get("note", ""))
        elif kind == b"X":
            ended = json.loads(payload)
            self.exit = JobExit(int(ended["code"]), ended.get("cpu_seconds"))
        elif kind != b"K":
            raise ResultError(f"the agent sent an unexpected frame {kind!r} before the exit")
