"""The job agent, run on an instance by one SSH exec per job: it stages the job, starts it (by
the resident runner when there is one), waits for it and streams its log, exit code and result
files back on the same channel.

Why one channel: with a 50 ms link every round trip counts, and a warm job used to take about
30 (exec channels for staging, writing files, starting, watching; SFTP for logs and results).
Now the request goes up on stdin once, and everything else comes back as frames on stdout:
``kind (1 byte) | length (4 bytes, big-endian) | payload``. Only the job's exit is waited for,
by a blocking wait on its process, not a sleep loop.

Runs with the instance's Python as ``python -I -S``: standard library only, so nothing a job
installs can break it, and it starts in milliseconds. ``attach`` picks up a job started by an
earlier agent whose connection was lost; the job itself never depended on that connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import time

BASE = os.path.dirname(os.path.abspath(__file__))
STORE = os.path.join(BASE, "store")
SOURCES = os.path.join(BASE, "sources")

ENV_FILE = "job.env"
SCRIPT_FILE = "job.sh"
SHELL_RUNNER = "run.sh"
LOG_FILE = "job.log"
EXIT_FILE = "exit_code"
CLAIM_DIR = ".claimed"  # made by whoever starts the job: the runner or this agent, never both
PID_FILE = "pid"
SECRET_PREFIX = ".secret-"  # a file-valued variable's file (a credential): gone when the job ends

CHUNK = 256 * 1024
LOG_SECONDS = 1.0  # how often a running job's new output is sent
RUNNER_REPLY_SECONDS = 30.0  # the runner may still be importing Snakemake when it is asked
EXIT_FILE_SECONDS = 5.0  # a job killed by a signal gets its exit code from the runner, late
PROC_POLL_SECONDS = 0.1  # only without pidfd (kernels before 5.3)

# The plain way, when there is no runner: the job's environment, then its script, then its exit
# code renamed into place (a reader never sees half a file). The env file holds secrets: gone
# as soon as it is read.
_SHELL_RUNNER = f"""\
. ./{ENV_FILE}
rm -f {ENV_FILE}
/bin/sh ./{SCRIPT_FILE}
echo $? > {EXIT_FILE}.tmp
mv -f {EXIT_FILE}.tmp {EXIT_FILE}
"""


class AgentError(Exception):
    """Something the local side must be told; the job did not (or cannot) run."""


class Frames:
    """The framed stdout stream back to the local side."""

    def __init__(self, stream) -> None:
        self._out = stream

    def send(self, kind: bytes, payload: bytes = b"", flush: bool = True) -> None:
        self._out.write(kind + len(payload).to_bytes(4, "big") + payload)
        if flush:
            self._out.flush()

    def send_json(self, kind: bytes, value: object) -> None:
        self.send(kind, json.dumps(value).encode())


# -- staging -----------------------------------------------------------------------------------


def place_blob(digest: str) -> str:
    """The stored file of digest; an upload still under its .partial name is moved into place
    (two agents may race for it: whoever loses finds it in place)."""
    final = os.path.join(STORE, digest)
    if not os.path.exists(final):
        with contextlib.suppress(FileNotFoundError):
            os.rename(final + ".partial", final)
    if not os.path.exists(final):
        raise AgentError(f"file {digest[:12]} is not in the instance's store")
    return final


def unpacked_sources(digest: str) -> str:
    """The workflow sources of this digest, unpacked once per instance."""
    directory = os.path.join(SOURCES, digest[:16])
    if os.path.isdir(directory):
        return directory
    import tarfile  # here: most jobs find the sources unpacked, and every ms of start counts

    archive = place_blob(digest)
    partial = f"{directory}.{os.urandom(4).hex()}.tmp"
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(partial, filter="data")
        else:  # Python before 3.11.4; our own archive, so no member can be hostile
            tar.extractall(partial)
    try:
        os.rename(partial, directory)
    except OSError:  # another agent unpacked it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def write_private(path: str, text: str) -> None:
    """A file only its owner can read, from its first byte (it may hold secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def prepare(request: dict) -> str:
    """A fresh job directory: the sources, the inputs from the store, the job's files."""
    job_dir = os.path.abspath(request["job_dir"])
    sources = unpacked_sources(request["sources"])
    shutil.rmtree(job_dir, ignore_errors=True)
    shutil.copytree(sources, job_dir, symlinks=True)
    for digest, relative in request["links"]:
        target = os.path.join(job_dir, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(place_blob(digest), target)
    exports = write_secret_files(job_dir, request["files"])
    write_private(os.path.join(job_dir, ENV_FILE), request["env"] + exports)
    write_private(os.path.join(job_dir, SCRIPT_FILE), request["command"])
    return job_dir


def write_secret_files(job_dir: str, files: list) -> str:
    """Each file-valued variable's content as a private file in the job directory; returns
    the ``export`` lines that point the variables at them."""
    if not files:
        return ""
    import shlex  # here: most jobs have no such file, and every ms of start counts

    lines = []
    for name, content in files:
        path = os.path.join(job_dir, SECRET_PREFIX + name)
        write_private(path, content)
        lines.append(f"export {name}={shlex.quote(path)}\n")
    return "".join(lines)


def remove_secret_files(job_dir: str) -> None:
    """The job has ended: its credential files go at once, before its results are sent."""
    try:
        names = os.listdir(job_dir)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(SECRET_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(job_dir, name))


# -- starting ----------------------------------------------------------------------------------


def ask_runner(prefix: str, job_dir: str) -> tuple[int | None, str]:
    """(pid, "") when the resident runner forked the job, else (None, why not)."""
    if not prefix:
        return None, "the runner is turned off"
    request = {"job_dir": job_dir, "environ": dict(os.environ)}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(RUNNER_REPLY_SECONDS)
            sock.connect(prefix + ".sock")
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(sock.makefile("rb").readline() or b"{}")
    except (FileNotFoundError, ConnectionRefusedError):
        revive_runner(prefix)
        return None, "the runner is not running; a new one starts for the next jobs"
    except (OSError, ValueError) as error:
        return None, f"the runner did not answer ({error})"
    if isinstance(reply.get("pid"), int):
        return reply["pid"], ""
    return None, f"the runner refused: {reply.get('refused', 'no reason given')}"


def revive_runner(prefix: str) -> None:
    """Start a runner for the next jobs (it exits at once if one holds its lock)."""
    script = prefix + ".py"
    if not os.path.exists(script):
        return
    with open(prefix + ".log", "ab") as log:
        subprocess.Popen(
            [sys.executable, script, prefix],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_plain(job_dir: str) -> subprocess.Popen:
    """The job as its own process session under /bin/sh, as without a runner."""
    write_private(os.path.join(job_dir, SHELL_RUNNER), _SHELL_RUNNER)
    with open(os.path.join(job_dir, LOG_FILE), "ab") as log:
        return subprocess.Popen(
            ["/bin/sh", SHELL_RUNNER],
            cwd=job_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def claimed_pid(job_dir: str) -> int:
    """The pid the runner recorded for a job it claimed (it writes it right after the fork)."""
    deadline = time.monotonic() + RUNNER_REPLY_SECONDS
    path = os.path.join(job_dir, PID_FILE)
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError), open(path) as handle:
            return int(handle.read())
        time.sleep(PROC_POLL_SECONDS)
    raise AgentError("the runner claimed the job but never started it")


def use_image_path() -> None:
    """The image's own PATH first, as the image's processes have it: a non-interactive SSH
    session lacks it (on vastai/pytorch, /venv/main/bin, where torch is). The bootstrap read
    it from the container's main process."""
    try:
        with open(os.path.join(BASE, "image-path")) as handle:
            image_path = handle.read().strip()
    except FileNotFoundError:
        return
    if image_path:
        os.environ["PATH"] = image_path + os.pathsep + os.environ.get("PATH", "")


def start(request: dict, frames: Frames) -> tuple[int, subprocess.Popen | None]:
    job_dir = prepare(request)
    use_image_path()
    pid, why = ask_runner(request.get("runner", ""), job_dir)
    child = None
    if pid is None:
        try:
            os.mkdir(os.path.join(job_dir, CLAIM_DIR))
        except FileExistsError:  # the runner took it after all, just as we gave up on it
            pid = claimed_pid(job_dir)
        else:
            child = start_plain(job_dir)
            pid = child.pid
            with open(os.path.join(job_dir, PID_FILE), "w") as handle:
                handle.write(str(pid))
    frames.send_json(b"S", {"pid": pid, "runner": child is None, "note": why})
    return pid, child


# -- waiting -----------------------------------------------------------------------------------


class LogTail:
    """Sends what the job wrote to its log since the last call."""

    def __init__(self, job_dir: str, offset: int, frames: Frames) -> None:
        self.path = os.path.join(job_dir, LOG_FILE)
        self.offset = offset
        self.frames = frames

    def send_new(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                while chunk := handle.read(CHUNK):
                    self.frames.send(b"L", chunk, flush=False)
                    self.offset += len(chunk)
        except FileNotFoundError:
            return
        self.frames.send(b"K", b"")  # a keep-alive mark, and the flush


def wait_for_exit(pid: int, tail: LogTail) -> None:
    """Block until the process ends, sending its log every LOG_SECONDS meanwhile."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd here: look at /proc instead
        while alive(pid):
            tail.send_new()
            time.sleep(PROC_POLL_SECONDS)
        return
    try:
        while not select.select([handle], [], [], LOG_SECONDS)[0]:
            tail.send_new()
    finally:
        os.close(handle)


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not: it has ended, whoever reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def read_exit(job_dir: str) -> tuple[int, float | None] | None:
    """(exit code, CPU seconds when known) from the job's exit file, if written."""
    try:
        with open(os.path.join(job_dir, EXIT_FILE)) as handle:
            fields = handle.read().split()
    except FileNotFoundError:
        return None
    if not fields:
        return None
    return int(fields[0]), (float(fields[1]) if len(fields) > 1 else None)


def exit_of(job_dir: str, child: subprocess.Popen | None) -> tuple[int, float | None]:
    if child is not None:  # our own child: its status and its CPU, straight from the kernel
        _, status, usage = os.wait4(child.pid, 0)
        recorded = read_exit(job_dir)
        code = recorded[0] if recorded else _exit_code(status)
        return code, round(usage.ru_utime + usage.ru_stime, 4)
    deadline = time.monotonic() + EXIT_FILE_SECONDS
    while (recorded := read_exit(job_dir)) is None:
        if time.monotonic() > deadline:
            raise AgentError("the job's process ended without recording an exit code")
        time.sleep(PROC_POLL_SECONDS)
    return recorded


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


# -- results -----------------------------------------------------------------------------------


class Results:
    """Sends the wanted files of a finished job: regular files only, each exactly as long as it
    was when its turn came, so a host's /dev/zero or FIFO cannot make a download endless. In a
    directory output, a link that stays inside it goes as a link; one that leaves is refused by
    name. A directory output that would pass max_entries is refused whole, before any of it
    goes (the local side stops there anyway)."""

    def __init__(self, job_dir: str, frames: Frames, max_entries: int) -> None:
        self.job_dir = job_dir
        self.frames = frames
        self.max_entries = max_entries
        self.entries = 0  # files, links and directories of directory outputs sent
        self.missing: list[str] = []

    def send(self, wanted: list[str], optional: set[str]) -> None:
        for relative in wanted:
            path = os.path.join(self.job_dir, relative)
            try:
                info = os.stat(path)
            except FileNotFoundError:
                if relative not in optional:
                    self.missing.append(relative)
                continue
            if stat.S_ISDIR(info.st_mode):
                self._send_tree(relative)
            else:
                self._send_file(relative)

    def _refuse(self, relative: str, reason: str) -> None:
        self.frames.send_json(b"R", {"path": relative, "reason": reason})

    def _send_tree(self, top: str) -> None:
        path = os.path.join(self.job_dir, top)
        entries = 1 + sum(len(dirs) + len(files) for _, dirs, files in os.walk(path))
        if self.entries + entries > self.max_entries:
            self._refuse(
                top,
                f"{entries} files, links and directories, of at most {self.max_entries} per "
                "job; pack them into one archive",
            )
            return
        self.entries += entries
        inside = os.path.realpath(path)
        for root, dirs, files in os.walk(path):  # links to directories are listed, not walked
            relative_root = os.path.relpath(root, self.job_dir)
            self.frames.send_json(b"M", {"path": relative_root})
            for name in sorted(dirs):
                if os.path.islink(os.path.join(root, name)):
                    self._send_link(os.path.join(relative_root, name), inside)
            for name in sorted(files):
                relative = os.path.join(relative_root, name)
                if os.path.islink(os.path.join(root, name)):
                    self._send_link(relative, inside)
                else:
                    self._send_file(relative)

    def _send_link(self, relative: str, inside: str) -> None:
        """The link, as a relative link to what it resolves to, when that lies inside the
        directory output (``inside``, resolved)."""
        path = os.path.join(self.job_dir, relative)
        resolved = os.path.realpath(path)
        if not os.path.exists(resolved):
            self._refuse(relative, f"a link to nothing ({os.readlink(path)})")
        elif resolved != inside and not resolved.startswith(inside + os.sep):
            self._refuse(relative, f"a link out of its directory output ({os.readlink(path)})")
        else:
            target = os.path.relpath(resolved, os.path.realpath(os.path.dirname(path)))
            self.frames.send_json(b"Y", {"path": relative, "target": target})

    def _send_file(self, relative: str) -> None:
        path = os.path.join(self.job_dir, relative)
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as error:
            self._refuse(relative, error.strerror or str(error))
            return
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                self._refuse(relative, _kind(info.st_mode))
                return
            size = info.st_size
            self.frames.send_json(b"F", {"path": relative, "size": size, "mode": info.st_mode})
            digest = hashlib.sha256()
            left = size
            while left > 0 and (chunk := handle.read(min(CHUNK, left))):
                digest.update(chunk)
                self.frames.send(b"D", chunk, flush=False)
                left -= len(chunk)
            if left:
                self.frames.send_json(b"E", {"error": "the file shrank while it was sent"})
                return
        stored = self._store(path, digest.hexdigest())
        self.frames.send_json(b"E", {"sha256": digest.hexdigest(), "stored": stored})

    @staticmethod
    def _store(path: str, digest: str) -> bool:
        """Keep the file in the store for the next job (a hard link, renamed into place)."""
        partial = os.path.join(STORE, f"{digest}.{os.urandom(4).hex()}.link")
        try:
            os.link(path, partial)
            os.replace(partial, os.path.join(STORE, digest))
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            return False
        return True


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device")):
        if test(mode):
            return f"not a regular file ({name})"
    return "not a regular file"


# -- the whole job -----------------------------------------------------------------------------


def run(request: dict, frames: Frames) -> None:
    job_dir = os.path.abspath(request["job_dir"])
    os.makedirs(STORE, exist_ok=True)
    if request["mode"] == "start":
        pid, child = start(request, frames)
        offset = 0
    else:
        if not os.path.isdir(job_dir):
            raise AgentError(f"the job directory {request['job_dir']} is gone")
        pid = request["pid"] or claimed_pid(job_dir)
        child, offset = None, request.get("log_offset", 0)
    tail = LogTail(job_dir, offset, frames)
    wait_for_exit(pid, tail)
    remove_secret_files(job_dir)
    code, cpu = exit_of(job_dir, child)
    tail.send_new()
    frames.send_json(b"X", {"code": code, "cpu_seconds": cpu})
    logs = list(request["logs"])
    wanted = [*request["outputs"], *logs] if code == 0 else logs
    results = Results(job_dir, frames, request["max_entries"])
    results.send(wanted, optional=set(logs))
    shutil.rmtree(job_dir, ignore_errors=True)
    usage = os.times()
    frames.send_json(
        b"Z",
        {"missing": results.missing, "agent_cpu_seconds": round(usage.user + usage.system, 4)},
    )


def main() -> int:
    frames = Frames(sys.stdout.buffer)
    try:
        run(json.loads(sys.stdin.buffer.read()), frames)
    except AgentError as error:
        frames.send_json(b"!", {"message": str(error)})
        return 1
    except (OSError, ValueError, KeyError) as error:
        frames.send_json(b"!", {"message": f"{type(error).__name__}: {error}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
