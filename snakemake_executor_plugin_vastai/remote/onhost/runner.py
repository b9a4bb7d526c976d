"""The resident runner: one per instance, started by the bootstrap, run as
``python runner-<key>.py <prefix>``. It imports Snakemake once and forks a child per job.

Why: a fresh ``python -m snakemake`` spends about a second on the interpreter and imports
before the job's own work starts, and as much CPU; a fork of a process that has it all loaded
reaches the job's shell in tens of milliseconds. The job agent asks over a Unix socket
(``<prefix>.sock``) and falls back to a plain process whenever this runner is missing, dead
or refuses, so nothing depends on it.

Rules the fork must keep: this process holds no threads when it forks (a thread's locks would
be copied held); each child starts its own session (killing the job kills its process group),
gets default signal handlers, the environment of the agent that asked plus the job's
environment file, the job's directory as its working directory (also where Snakemake recorded
it at import), and flushes its output and runs exit handlers before it exits. The modules a
child imported are learned from the first job and loaded here for the next ones, but only
those of Snakemake and its dependencies: a user's libraries may start threads or a GPU context.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib
import json
import os
import re
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import TextIO

ENV_FILE = "job.env"
SCRIPT_FILE = "job.sh"
LOG_FILE = "job.log"
EXIT_FILE = "exit_code"
CLAIM_DIR = ".claimed"
PID_FILE = "pid"

# Loaded at start, before any job: the first wave of a fan-out is forked before the first job
# could teach the rest. smart_open (through snakemake.storage) is most of a job's own imports.
PRELOAD = (
    "snakemake.cli",
    "snakemake.api",
    "snakemake.workflow",
    "snakemake.dag",
    "snakemake.storage",
    "smart_open",
)
WARM_PARSER = "(argument parser)"  # a deny-list entry: skip warming the plugin registries
REQUEST_SECONDS = 10.0  # the agent sends its request as soon as it has connected
# Outside single quotes, these make a command line more than ``python -m snakemake ARGS``.
_SHELL_SYNTAX = re.compile(r"""[$`*?\[\]~{}\\"<>|;&()!#\n]""")
_PYTHONS = {"python", "python3", sys.executable}


def snakemake_args(command: str) -> list[str] | None:
    """The arguments of ``python -m snakemake ARGS``, or None for any other command line
    (which then runs under /bin/sh, exactly as written)."""
    unquoted = re.sub(r"'[^']*'", "", command.strip())
    if "'" in unquoted or _SHELL_SYNTAX.search(unquoted):
        return None
    words = shlex.split(command)
    if len(words) < 3 or words[0] not in _PYTHONS or words[1:3] != ["-m", "snakemake"]:
        return None
    return words[3:]


def read_env_file(path: str) -> dict[str, str]:
    """The job's ``export NAME='value'`` lines (as the local side wrote them, shell-quoted)."""
    with open(path, newline="") as handle:  # a value may hold a carriage return
        words = shlex.split(handle.read())  # whole: a quoted value may span lines
    pairs = zip(words[::2], words[1::2], strict=False)
    return dict(word.partition("=")[::2] for export, word in pairs if export == "export")


def snakemake_modules() -> set[str]:
    """Top-level module names of Snakemake and everything it depends on (installed)."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires

    wanted, seen = ["snakemake"], set()
    while wanted:
        name = wanted.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = requires(name) or []
        except PackageNotFoundError:
            continue
        for requirement in requirements:
            if "extra ==" not in requirement:
                wanted.append(re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0])
    return {
        module
        for module, dists in packages_distributions().items()
        if any(d.lower().replace("_", "-") in seen for d in dists)
    }


class Runner:
    def __init__(self, prefix: str) -> None:
        self.socket_name = prefix + ".sock"  # relative: a socket path may not be long
        self.prefix = os.path.abspath(prefix)  # children write here from their job directory
        self.children: dict[int, str] = {}  # pid -> job directory
        self.allowed: set[str] = set()
        self.learned = False
        self.listener: socket.socket | None = None
        self.pid_file: TextIO | None = None  # holds the lock for this process's life
        self.wake_read, self.wake_write = os.pipe()

    # -- start -------------------------------------------------------------------------

    def lock(self) -> bool:
        """One runner per prefix: the pid file's lock says who it is."""
        self.pid_file = open(self.prefix + ".pid", "a+")  # noqa: SIM115 (held for life)
        try:
            fcntl.flock(self.pid_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        self.pid_file.truncate(0)
        self.pid_file.write(str(os.getpid()))
        self.pid_file.flush()
        return True

    def listen(self) -> None:
        """Bound before the imports, so an early job waits for us instead of running plain."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_name)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket_name)
        self.listener.listen(64)

    def preload(self) -> None:
        self._load((*PRELOAD, *self._lines(".modules")))
        self.learned = os.path.exists(self.prefix + ".modules")
        self.allowed = snakemake_modules()
        if WARM_PARSER not in self._lines(".deny"):
            self._warm_plugin_registries()

    def _load(self, modules: tuple[str, ...] | list[str]) -> None:
        """Import each module not yet loaded nor denied; one that starts a thread is denied
        and this process starts afresh without it."""
        denied = set(self._lines(".deny"))
        for module in modules:
            if module in denied or module in sys.modules:
                continue
            with contextlib.suppress(Exception):
                importlib.import_module(module)
            if threading.active_count() > 1:
                self._deny(module)

    def _warm_plugin_registries(self) -> None:
        """Building Snakemake's argument parser discovers every installed plugin, once per
        process: done here, each job's own parse skips that (about 0.07 CPU-s a job)."""
        with contextlib.suppress(Exception):
            importlib.import_module("snakemake.cli").get_argument_parser()
        if threading.active_count() > 1:
            self._deny(WARM_PARSER)

    def _deny(self, what: str) -> None:
        """Never load ``what`` again: it started a thread, so this process must start afresh
        (a fork would copy that thread's locks, held)."""
        with open(self.prefix + ".deny", "a") as handle:
            handle.write(what + "\n")
        print(f"runner: {what} starts threads; restarting without it", flush=True)
        self._restart()

    def _lines(self, suffix: str) -> list[str]:
        try:
            return Path(self.prefix + suffix).read_text().split()
        except FileNotFoundError:
            return []

    def _restart(self) -> None:
        if self.listener is not None:
            self.listener.close()
        os.execv(sys.executable, [sys.executable, *sys.argv])

    # -- serve -------------------------------------------------------------------------

    def serve(self) -> None:
        os.set_blocking(self.wake_write, False)
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        assert self.listener is not None
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ)
        selector.register(self.wake_read, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    os.read(self.wake_read, 4096)
                    self._reap()

    def _accept(self) -> None:
        assert self.listener is not None
        connection, _ = self.listener.accept()
        with connection:
            connection.settimeout(REQUEST_SECONDS)
            try:
                request = json.loads(connection.makefile("rb").readline())
                reply = self._start(request["job_dir"], request["environ"], connection)
            except (OSError, ValueError, KeyError) as error:
                reply = {"refused": f"{type(error).__name__}: {error}"}
            with contextlib.suppress(OSError):
                connection.sendall(json.dumps(reply).encode() + b"\n")

    def _start(self, job_dir: str, environ: dict[str, str], connection: socket.socket) -> dict:
        if threading.active_count() > 1:
            return {"refused": f"the runner holds {threading.active_count()} threads"}
        try:
            os.mkdir(os.path.join(job_dir, CLAIM_DIR))
        except FileExistsError:
            return {"refused": "the job was already started"}
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._child(job_dir, environ, connection)
        self.children[pid] = job_dir
        with open(os.path.join(job_dir, PID_FILE), "w") as handle:
            handle.write(str(pid))
        return {"pid": pid}

    def _reap(self) -> None:
        """Collect ended children; one killed before it recorded its exit gets one here."""
        while self.children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job_dir = self.children.pop(pid, None)
            if job_dir and not os.path.exists(os.path.join(job_dir, EXIT_FILE)):
                code = os.waitstatus_to_exitcode(status)
                code = 128 - code if code < 0 else code
                with contextlib.suppress(OSError):
                    record_exit(job_dir, code, usage.ru_utime + usage.ru_stime)
            if not self.learned:
                self._learn()

    def _learn(self) -> None:
        """Load what the first job imported (Snakemake's own modules only), once."""
        self.learned = True
        self._load(self._lines(".modules"))

    # -- the child ---------------------------------------------------------------------

    def _child(self, job_dir: str, environ: dict[str, str], connection: socket.socket) -> None:
        """Become the job; never returns."""
        code = 1
        try:
            os.setsid()
            signal.set_wakeup_fd(-1)
            for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(number, signal.SIG_DFL)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python itself sets it
            signal.signal(signal.SIGINT, signal.default_int_handler)
            connection.close()
            assert self.listener is not None
            self.listener.close()
            os.close(self.wake_read)
            os.close(self.wake_write)
            # The lock belongs to the open file, which the fork shares: a job holding it would
            # keep the next runner out after this one dies or restarts, until the job ends.
            if self.pid_file is not None:
                self.pid_file.close()
            os.chdir(job_dir)
            env = read_env_file(ENV_FILE)
            os.unlink(ENV_FILE)
            os.environ.clear()
            os.environ.update(environ)
            os.environ.update(env)
            _redirect_output(LOG_FILE)
            code = self._run_job(Path(SCRIPT_FILE).read_text())
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
                usage = os.times()
                record_exit(".", code, usage.user + usage.system + usage.children_user
                            + usage.children_system)  # fmt: skip
            os._exit(code)

    def _run_job(self, command: str) -> int:
        args = snakemake_args(command)
        if args is None:
            return subprocess.call(["/bin/sh", SCRIPT_FILE])
        import snakemake.cli
        import snakemake.workflow

        # Snakemake notes the working directory when snakemake.workflow is imported.
        snakemake.workflow.Workflow._rundir = str(Path.cwd().absolute())
        sys.argv = [str(Path(snakemake.cli.__file__).with_name("__main__.py")), *args]
        try:
            snakemake.cli.main(args)
            code = 0
        except SystemExit as done:
            code = _exit_status(done.code)
        atexit._run_exitfuncs()
        if not self.learned:
            self._note_modules()
        return code

    def _note_modules(self) -> None:
        names = sorted(
            name
            for name in list(sys.modules)
            if name.partition(".")[0] in self.allowed and not name.startswith("snakemake.cli")
        )
        partial = f"{self.prefix}.modules.{os.getpid()}"
        Path(partial).write_text("\n".join(names) + "\n")
        os.replace(partial, self.prefix + ".modules")


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _redirect_output(path: str) -> None:
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)


def record_exit(job_dir: str, code: int, cpu_seconds: float) -> None:
    """The exit file the agent waits for, renamed into place whole."""
    path = os.path.join(job_dir, EXIT_FILE)
    with open(path + ".tmp", "w") as handle:
        handle.write(f"{code} {cpu_seconds:.4f}\n")
    os.replace(path + ".tmp", path)


def main() -> int:
    prefix = sys.argv[1]
    runner = Runner(prefix)
    if not runner.lock():
        return 0  # another runner serves this prefix
    runner.listen()
    runner.preload()
    print(f"runner: pid {os.getpid()} serving {prefix}.sock", flush=True)
    runner.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
