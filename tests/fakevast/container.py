"""Instance runtime of the fake Vast.ai marketplace: every rented instance is a real sshd.

As root, an instance is a private mount + PID namespace whose root is a copy-on-write overlay of
this machine's ``/`` (the upper layer lives in the instance's state dir). Jobs can then install
packages, write ``/root/.ssh`` and leave ``nohup``'d processes behind for real, two instances
never see each other's writes, and killing the namespace's PID 1 ends every process it holds.
Without root, each instance falls back to an sshd of the current user in its own directory.

An image whose name starts with ``nossh/`` has no OpenSSH and no apt-get: no sshd runs, the port
the relays forward to has nothing listening, and (isolated) overlay whiteouts hide the binaries.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import time
import types
import venv
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT = 20.0
_START_ATTEMPTS = 3
STOP_TIMEOUT = 10.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BARE_IMAGE_PREFIX = "bare/"
# Like the real vastai/pytorch: a venv at /venv/main whose python has a module (torch there,
# TORCH_STUB here) no other Python has, and the image's PATH, with the venv's bin first, only in
# the main process's environment (a non-interactive SSH session gets sshd's default PATH).
PYTORCH_IMAGE_PREFIX = "vastai/pytorch"
IMAGE_VENV = "/venv/main"
TORCH_STUB = "vast_torch_stub"
# Like an image without OpenSSH and without apt (alpine, distroless, ...): neither exists in the
# instance, and nothing listens behind its SSH endpoints, though Vast.ai reports it running.
NO_SSHD_IMAGE_PREFIX = "nossh/"
NO_SSHD_HIDDEN = ("sshd", "apt-get", "apt")
_POLL_INTERVAL = 0.02
_LOG_TAIL_CHARS = 2000
# Unisolated instances cannot be told apart by namespace; this variable tags their processes.
_MARKER = "FAKEVAST_INSTANCE_DIR"

# PID 1 of the new namespaces runs this while it still sees the host's /: it builds the
# instance's root and enters it. $1 = state dir, $2/$3 = mount/chroot binaries (absolute, as the
# container env may replace PATH), the rest = the command to run inside the instance.
_ENTER_SCRIPT = """\
set -e
state=$1 mount=$2 chroot=$3
shift 3
root=$state/root
"$mount" -t overlay overlay -o "lowerdir=/,upperdir=$state/upper,workdir=$state/work" "$root"
"$mount" -t proc proc "$root/proc"
"$mount" --rbind /dev "$root/dev"
"$mount" -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
: > "$state/entered"
exec "$chroot" "$root" "$@"
"""

# The main process of an ssh-mode instance. $1 = sshd_config, $2 = sshd's pid file (sshd writes
# it once it listens), $3 = onstart script, the rest = the names of the main-process-only
# variables (ContainerSpec.main_env), which sshd is started without: sshd gives its sessions a
# fresh environment anyway, and this makes sure no session can inherit them. The onstart script
# does inherit them, as it does on Vast.ai. The main process stays alive until destroy, and as it
# waits it also reaps orphaned jobs, so a finished nohup'd job does not linger as a zombie that
# `kill -0` sees.
_INIT_SCRIPT = """\
trap 'exit 1' USR1
config=$1 pid_file=$2 onstart=$3
shift 3
{ (unset "$@"; exec /usr/sbin/sshd -D -e -f "$config"); [ -s "$pid_file" ] || kill -USR1 $$; } &
while [ ! -s "$pid_file" ]; do sleep 0.05; done
if [ -f "$onstart" ]; then /bin/sh "$onstart" & fi
while :; do sleep 3600 & wait $!; done
"""

# The main process of an ssh-mode instance whose image has no sshd: what Vast.ai's init does
# there, minus the sshd that is not there. $1 = onstart script.
_NO_SSHD_INIT_SCRIPT = """\
onstart=$1
if [ -f "$onstart" ]; then /bin/sh "$onstart" & fi
while :; do sleep 3600 & wait $!; done
"""


class ContainerError(Exception):
    """An instance could not be started or driven."""


@dataclass
class ContainerSpec:
    """What the renter asked for: image, runtype (ssh or args), onstart/args, env and keys.

    ``main_env`` is what the marketplace itself adds to the environment of the instance's main
    process only (Vast.ai's ``CONTAINER_ID`` and scoped ``CONTAINER_API_KEY``): not to
    ``/etc/environment``, sshd's ``SetEnv`` or sshd's own environment, so SSH sessions never see
    it; processes the main process starts (the onstart script) inherit it.
    """

    instance_id: int
    image: str
    ssh: bool
    onstart: str | None
    args: list[str] | None
    env: dict[str, str]
    authorized_keys: list[str]
    main_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Layout:
    """Where an instance's own files live, as paths seen from inside the instance.

    ``base`` maps them to the host: the overlay's upper dir when isolated (files put there before
    the mount simply appear in the instance), ``/`` when not (paths are host paths already).
    """

    base: Path
    home: str
    bin_dir: str
    venv: str
    config: str
    host_key: str
    authorized_keys: str
    pid_file: str
    init: str
    onstart: str

    @classmethod
    def isolated(cls, state_dir: Path) -> _Layout:
        return cls(
            base=state_dir / "upper",
            home="/root",
            bin_dir="/usr/local/bin",
            venv=IMAGE_VENV,
            config="/etc/ssh/sshd_config",
            host_key="/etc/ssh/ssh_host_ed25519_key",
            authorized_keys="/root/.ssh/authorized_keys",
            pid_file="/run/sshd.pid",
            init="/etc/fakevast/init.sh",
            onstart="/etc/fakevast/onstart.sh",
        )

    @classmethod
    def unisolated(cls, state_dir: Path) -> _Layout:
        top = str(state_dir.resolve())
        return cls(
            base=Path("/"),
            home=f"{top}/home",
            bin_dir=f"{top}/bin",
            venv=f"{top}{IMAGE_VENV}",
            config=f"{top}/sshd_config",
            host_key=f"{top}/ssh_host_ed25519_key",
            authorized_keys=f"{top}/home/.ssh/authorized_keys",
            pid_file=f"{top}/sshd.pid",
            init=f"{top}/init.sh",
            onstart=f"{top}/onstart.sh",
        )

    def host(self, inner: str) -> Path:
        return self.base / inner.lstrip("/")

    def make_dir(self, inner: str, mode: int = 0o755) -> Path:
        """Create `inner` and its parents; a dir that exists on the host keeps its owner and
        mode, since an upper-layer dir's attributes replace the lower one's in the instance."""
        path = self.base
        for part in Path(inner).parts[1:]:
            path = path / part
            if path.is_dir():
                continue
            lower = Path("/", path.relative_to(self.base))
            info = lower.stat() if lower.is_dir() else None
            path.mkdir()
            if info is not None:
                os.chown(path, info.st_uid, info.st_gid)
                os.chmod(path, info.st_mode & 0o7777)
            else:
                os.chmod(path, mode)
        return path

    def write(self, inner: str, text: str, mode: int = 0o644) -> None:
        self.make_dir(str(Path(inner).parent))
        path = self.host(inner)
        path.write_text(text)
        os.chmod(path, mode)


@dataclass(frozen=True)
class _Process:
    pid: int
    ppid: int
    comm: str


def image_python(image: str) -> str:
    """The interpreter a session's ``python`` runs: ``bare/`` images lack snakemake."""
    if image.startswith(BARE_IMAGE_PREFIX):
        return os.path.join(sys.base_prefix, "bin", "python3")
    return sys.executable


def has_sshd(image: str) -> bool:
    """Whether the image has OpenSSH's sshd (and apt-get); ``nossh/`` images have neither."""
    return not image.startswith(NO_SSHD_IMAGE_PREFIX)


def has_image_venv(image: str) -> bool:
    """Whether the image has its own Python venv at /venv/main (vastai/pytorch does)."""
    return image.startswith(PYTORCH_IMAGE_PREFIX)


class _ImageVenvBuilder(venv.EnvBuilder):
    """``python -m venv --system-site-packages --symlinks --without-pip`` of this machine's base
    Python, built at a host path (`host_dir`) but written as if at `inner`, the path the instance
    sees: its activate scripts and pyvenv.cfg name `inner`."""

    def __init__(self, host_dir: Path, inner: str) -> None:
        super().__init__(system_site_packages=True, symlinks=True, with_pip=False)
        self.host_dir, self.inner = str(host_dir), inner

    def replace_variables(self, text: str, context: types.SimpleNamespace) -> str:
        return super().replace_variables(text, context).replace(self.host_dir, self.inner)

    def create_configuration(self, context: types.SimpleNamespace) -> None:
        super().create_configuration(context)
        config = Path(context.cfg_path)
        config.write_text(config.read_text().replace(self.host_dir, self.inner))


def _build_image_venv(host_dir: Path, inner: str) -> None:
    """The image's venv: this machine's base Python with its system site-packages, plus (a .pth
    file) the site-packages of the Python the fake runs on, so Snakemake and whatever else is
    installed here stays importable, as from a session's ``python``; and TORCH_STUB, which only
    this venv's python can import (torch is in /venv/main on the real image). A few ms."""
    _ImageVenvBuilder(host_dir, inner).create(host_dir)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = host_dir / "lib" / version / "site-packages"
    stub = f'"""Stands in for torch: importable from {inner} only."""\n\n__version__ = "0.0-fake"\n'
    (site_packages / f"{TORCH_STUB}.py").write_text(stub)
    if sys.prefix != sys.base_prefix:  # the fake runs in a venv: its packages are not system's
        dirs = dict.fromkeys(sysconfig.get_path(name) for name in ("purelib", "platlib"))
        lines = [f"import site; site.addsitedir({d!r})\n" for d in dirs]
        (site_packages / "fakevast-host-packages.pth").write_text("".join(lines))


# Probes of the namespaces before a root fake gives up (a busy machine may fail a fork).
_PROBE_ATTEMPTS = 5
_PROBE_PAUSE_SECONDS = 0.5


@functools.cache
def namespaces_available() -> bool:
    """Whether this process may create the mount + PID namespaces an isolated instance needs:
    not without root or `unshare`. As root with `unshare`, a probe that fails is tried again,
    and one that keeps failing is an error, never a quiet fallback: an unisolated instance
    writes to this machine's own home (a job's `$HOME` is root's), which every later instance
    of every test then sees."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "true"]
    for _ in range(_PROBE_ATTEMPTS):
        done = subprocess.run(probe, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return True
        time.sleep(_PROBE_PAUSE_SECONDS)
    raise ContainerError(
        f"cannot create the namespaces an instance needs ({done.stderr.strip()}), though "
        "running as root: refusing to run instances on this machine's own filesystem"
    )


@functools.cache
def _warn_unisolated() -> None:
    warnings.warn(
        "fakevast: cannot create namespaces (not root?); instances run unisolated, sharing this "
        "machine's filesystem and processes",
        RuntimeWarning,
        stacklevel=3,
    )


class Container:
    """One rented instance: a real sshd (or args-mode process) in its own view of this machine."""

    def __init__(
        self, spec: ContainerSpec, state_dir: Path, *, isolate: bool | None = None
    ) -> None:
        self.spec = spec
        self.state_dir = Path(state_dir)
        self.isolated = namespaces_available() if isolate is None else isolate
        if not self.isolated:
            _warn_unisolated()
        layout = _Layout.isolated if self.isolated else _Layout.unisolated
        self._layout = layout(self.state_dir)
        # Where the relays forward to: sshd's port, or for an image without sshd a port held
        # bound (not listening) by `_port_holder`, so that connections to it are refused.
        self.sshd_port: int | None = None
        self._port_holder: socket.socket | None = None
        self._log_path = self.state_dir / "container.log"
        self._final_log = ""
        self._pending_keys = list(spec.authorized_keys)
        self._proc: subprocess.Popen[bytes] | None = None
        self._init_pid: int | None = None
        self._pidns: _HeldNamespace | None = None
        self._lock = threading.Lock()
        self._prepared = False
        self._destroyed = False

    # -- public interface ---------------------------------------------------------------------

    def start(self) -> None:
        """Boot the instance; returns once sshd listens (ssh mode) or the main process runs.
        After a `halt` it starts again on the files it had, as `docker start` does: the main
        process (and with it the onstart script) runs afresh.

        sshd binds the port we picked a moment later, and anything on this machine may take it
        meanwhile. A real instance has a network of its own and never meets this, so the fake
        must not show it: a start that lost that race starts again on another port (sshd comes
        first, so nothing of the renter's ran yet)."""
        with self._lock:
            if self._destroyed:
                raise ContainerError(f"instance {self.spec.instance_id} was destroyed")
            if self._proc is not None:
                raise ContainerError(f"instance {self.spec.instance_id} was already started")
            if self._prepared:
                self._prepare_restart()
            else:
                self._prepare()
        for attempt in range(1, _START_ATTEMPTS + 1):
            with self._lock:
                if self._destroyed:
                    raise ContainerError(f"instance {self.spec.instance_id} was destroyed")
                log_start = self._log_size()
                self._proc = self._launch()
            try:
                self._wait_started()
                return
            except ContainerError:
                if not self._destroyed:
                    self._stop_processes()
                if self._destroyed or attempt == _START_ATTEMPTS or not self._lost_port(log_start):
                    raise
            with self._lock:
                self._forget_failed_start(log_start)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and not self._destroyed

    def add_authorized_key(self, key: str) -> None:
        """Allow `key` for new logins. Appending to the upper-layer file is seen at once by the
        instance, because a file that exists only in the upper layer *is* the instance's file."""
        with self._lock:
            if not self._prepared:
                self._pending_keys.append(key)
                return
            with self._layout.host(self._layout.authorized_keys).open("a") as handle:
                handle.write(key.strip() + "\n")

    def halt(self) -> None:
        """Kill every process of the instance, as `docker stop` does, and keep its files (the
        overlay's upper layer) for a later `start`; idempotent."""
        with self._lock:
            if not self._destroyed:
                self._stop_processes()

    def kill_sshd(self) -> None:
        """Simulate the host going offline: every sshd process dies, so live sessions drop."""
        for process in self._instance_processes():
            if process.comm == "sshd":
                _kill(process.pid)

    def log_text(self) -> str:
        """Everything the main process and the onstart script wrote, like ``docker logs``."""
        if self._destroyed:
            return self._final_log
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def destroy(self) -> None:
        """Kill every process of the instance and delete its state; idempotent."""
        with self._lock:
            if self._destroyed:
                return
            self._final_log = self.log_text()
            self._destroyed = True
            self._stop_processes()
            if self._port_holder is not None:
                self._port_holder.close()
            if self.state_dir.exists():
                shutil.rmtree(self.state_dir)

    # -- preparing the instance's files ---------------------------------------------------------

    def _prepare(self) -> None:
        layout = self._layout
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.isolated:
            self._prepare_overlay()
        layout.make_dir(layout.home, mode=0o700)
        layout.make_dir(str(Path(layout.authorized_keys).parent), mode=0o700)
        keys = "".join(key.strip() + "\n" for key in self._pending_keys)
        layout.write(layout.authorized_keys, keys, 0o600)
        python = shlex.quote(image_python(self.spec.image))
        for name in ("python", "python3"):
            # A wrapper, not a symlink: a venv's python is only a venv when run by its own path.
            layout.write(f"{layout.bin_dir}/{name}", f'#!/bin/sh\nexec {python} "$@"\n', 0o755)
        if has_image_venv(self.spec.image):
            _build_image_venv(layout.host(layout.venv), layout.venv)
        if self.spec.ssh and has_sshd(self.spec.image):
            self._prepare_sshd()
        elif self.spec.ssh:
            self._prepare_no_sshd()
        self._prepared = True

    def _prepare_overlay(self) -> None:
        for name in ("upper", "work", "root"):
            (self.state_dir / name).mkdir(exist_ok=True)
        layout = self._layout
        layout.make_dir("/workspace")
        if has_sshd(self.spec.image):
            layout.make_dir("/run/sshd")  # sshd's privilege-separation dir
        else:
            self._hide_programs()
        # Opaque upper dirs hide the host's: the folder holding every instance's state (so no
        # instance sees another's files) and /root/.ssh (no key of the host's). The rest of
        # the host stays visible, as an image would be: the project's venv may well live in
        # /tmp (a CI clone), and the default image's python is that venv's.
        state_root = str(self.state_dir.resolve().parent)
        for inner, mode in ((state_root, 0o700), ("/root/.ssh", 0o700)):
            os.setxattr(layout.make_dir(inner, mode), "trusted.overlay.opaque", b"y")
        # The host's own dotfiles (pyenv shims first on PATH) would decide what `python` is.
        for dotfile in Path("/etc/skel").glob(".*"):
            shutil.copy(dotfile, layout.host(f"/root/{dotfile.name}"))
        lines = [f"{name}={shlex.quote(value)}" for name, value in self._environment().items()]
        layout.write("/etc/environment", "".join(line + "\n" for line in lines))

    def _prepare_sshd(self) -> None:
        layout = self._layout
        self.sshd_port = _free_port()
        layout.make_dir(str(Path(layout.host_key).parent))
        self._generate_host_key(layout.host(layout.host_key))
        layout.write(layout.config, self._sshd_config())
        layout.write(layout.init, _INIT_SCRIPT, 0o755)
        if self.spec.onstart:
            layout.write(layout.onstart, self.spec.onstart, 0o755)

    def _hide_programs(self) -> None:
        """An image without OpenSSH and apt: an overlay whiteout (a character device 0:0 in the
        upper layer, made before the mount) hides each of NO_SSHD_HIDDEN in /usr/sbin and in
        every directory of the image's and the sessions' PATH. Directories are
        resolved on this machine first (/sbin is a link to usr/sbin on a merged-/usr system),
        so the whiteout lands in the real directory and the links stay links."""
        paths = {self._main_environment()["PATH"], self._environment()["PATH"]}
        dirs = {"/usr/sbin", *(d for path in paths for d in path.split(":") if d.startswith("/"))}
        for inner in sorted({os.path.realpath(d) for d in dirs}):
            for name in NO_SSHD_HIDDEN:
                target = Path(inner, name)
                if not os.path.lexists(target):
                    continue
                whiteout = self._layout.make_dir(inner) / name
                if not os.path.lexists(whiteout):
                    os.mknod(whiteout, stat.S_IFCHR | 0o600, os.makedev(0, 0))

    def _log_size(self) -> int:
        try:
            return self._log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _lost_port(self, log_start: int) -> bool:
        """Whether the start that logged from `log_start` on failed only because sshd's port
        was taken between our pick and its bind."""
        with self._log_path.open("rb") as log:
            log.seek(log_start)
            said = log.read().decode(errors="replace")
        return f"Bind to port {self.sshd_port} " in said and "Address already in use" in said

    def _forget_failed_start(self, log_start: int) -> None:
        """Back to a prepared instance on a fresh port, its log as if that start never was."""
        os.truncate(self._log_path, log_start)
        self._move_sshd()

    def _move_sshd(self) -> None:
        """sshd listens on a fresh port from its next start on."""
        self.sshd_port = _free_port()
        self._layout.write(self._layout.config, self._sshd_config())

    def _prepare_restart(self) -> None:
        """Before a start on the files of a halted run: the marks of that run's start go (a
        killed sshd leaves its pid file behind), so `_is_started` waits for this run's; sshd
        gets a fresh port, as another process may hold the old one by now."""
        self._layout.host(self._layout.pid_file).unlink(missing_ok=True)
        (self.state_dir / "entered").unlink(missing_ok=True)
        if self.spec.ssh and has_sshd(self.spec.image):
            self._move_sshd()

    def _prepare_no_sshd(self) -> None:
        """An ssh-mode instance of an image without sshd: its endpoints are published as
        usual, but they lead to a port held bound with nothing listening (refused)."""
        layout = self._layout
        self._port_holder = _bound_socket()
        self.sshd_port = self._port_holder.getsockname()[1]
        layout.write(layout.init, _NO_SSHD_INIT_SCRIPT, 0o755)
        if self.spec.onstart:
            layout.write(layout.onstart, self.spec.onstart, 0o755)

    def _generate_host_key(self, path: Path) -> None:
        """Each instance gets its own host key, so clients see distinct hosts as on Vast.ai."""
        comment = f"fakevast-instance-{self.spec.instance_id}"
        command = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ContainerError(f"ssh-keygen failed: {done.stderr.strip()}")

    def _sshd_config(self) -> str:
        layout = self._layout
        set_env = " ".join(_sshd_setenv_token(k, v) for k, v in self._environment().items())
        lines = [
            f"Port {self.sshd_port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {layout.host_key}",
            f"PidFile {layout.pid_file}",
            f"AuthorizedKeysFile {layout.authorized_keys}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PrintMotd no",
            "Subsystem sftp internal-sftp",
            "MaxSessions 50",
            "MaxStartups 50:30:100",
            # Far more often than OpenSSH's default, so every long transfer in the tests lives
            # through rekeys started by the host (the client never starts one).
            "RekeyLimit 64M",
            # sshd honours only the first SetEnv line, so every variable goes on this one.
            f"SetEnv {set_env}",
        ]
        return "".join(line + "\n" for line in lines)

    def _session_path(self) -> str:
        """sshd's default PATH (which a session gets whatever the image's PATH is)."""
        if self.isolated:
            return DEFAULT_PATH
        return f"{self._layout.bin_dir}:{DEFAULT_PATH}"

    def _image_path(self) -> str:
        """The PATH of the image's ENV: vastai/pytorch puts its venv's bin first."""
        if has_image_venv(self.spec.image):
            return f"{self._layout.venv}/bin:{self._session_path()}"
        return self._session_path()

    def _environment(self) -> dict[str, str]:
        """The env SSH sessions see (via SetEnv; also written to /etc/environment): the renter's
        env, with sshd's default PATH unless the renter gave one."""
        layout = self._layout
        env = {"HOME": layout.home, "PATH": self._session_path(), **self.spec.env}
        if not self.isolated:
            env[_MARKER] = str(self.state_dir.resolve())
        return env

    def _main_environment(self) -> dict[str, str]:
        """The main process's env, as Docker gives it: the image's PATH (unless the renter's env
        sets one) and the renter's env, plus the marketplace's `main_env`. The onstart script
        inherits it; sessions do not."""
        env = {**self._environment(), **self.spec.main_env}
        if "PATH" not in self.spec.env:
            env["PATH"] = self._image_path()
        return env

    # -- running it -----------------------------------------------------------------------------

    def _main_command(self) -> list[str]:
        """The instance's main process, as the instance names it."""
        layout = self._layout
        if self.spec.ssh and not has_sshd(self.spec.image):
            return ["/bin/sh", layout.init, layout.onstart]
        if self.spec.ssh:
            main_only = list(self.spec.main_env)
            return [
                "/bin/sh",
                layout.init,
                layout.config,
                layout.pid_file,
                layout.onstart,
                *main_only,
            ]
        argv = ([self.spec.onstart] if self.spec.onstart else []) + list(self.spec.args or [])
        if not argv:
            raise ContainerError(f"instance {self.spec.instance_id}: args mode needs a command")
        return argv

    def _launch(self) -> subprocess.Popen[bytes]:
        command = self._main_command()
        cwd: str | None = None
        if self.isolated:
            # `--kill-child` (implies --fork): should unshare die, its child PID 1 dies with it.
            unshare = [_which("unshare"), "--mount", "--pid", "--propagation=private"]
            unshare.append("--kill-child")
            enter = ["/bin/sh", "-c", _ENTER_SCRIPT, "fakevast-enter", str(self.state_dir)]
            command = [*unshare, *enter, _which("mount"), _which("chroot"), *command]
        else:
            cwd = self._layout.home
        with self._log_path.open("ab") as log:
            try:
                return subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._main_environment(),
                    cwd=cwd,
                    start_new_session=True,
                )
            except OSError as error:
                raise ContainerError(f"instance {self.spec.instance_id}: {error}") from error

    def _is_started(self) -> bool:
        """sshd writes its pid file once it listens; the enter script marks the chroot."""
        if self.spec.ssh and has_sshd(self.spec.image):
            try:
                return self._layout.host(self._layout.pid_file).stat().st_size > 0
            except FileNotFoundError:
                return False
        return not self.isolated or (self.state_dir / "entered").exists()

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._is_started():
            if self._destroyed:
                raise ContainerError(f"instance {self.spec.instance_id} destroyed while starting")
            if self._proc is not None and self._proc.poll() is not None:
                raise self._start_failure(f"exited with status {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise self._start_failure(f"not up after {START_TIMEOUT:.0f} s")
            time.sleep(_POLL_INTERVAL)
        if self.isolated:
            self._init_pid = self._find_init()
            if self._init_pid is not None:
                self._pidns = _HeldNamespace.of(self._init_pid)

    def _start_failure(self, what: str) -> ContainerError:
        tail = self.log_text()[-_LOG_TAIL_CHARS:].strip()
        return ContainerError(
            f"instance {self.spec.instance_id} ({self.spec.image}) failed to start: {what}; "
            f"log:\n{tail}"
        )

    # -- finding and stopping its processes -----------------------------------------------------

    def _find_init(self) -> int | None:
        """PID 1 of the instance's namespace: the only child of `unshare --fork`."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        pid = self._proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def _instance_processes(self) -> list[_Process]:
        processes = _processes()
        if self.isolated:
            namespace = self._pidns
            if namespace is None:
                return []
            return [p for p in processes if namespace.holds(p.pid)]
        return self._unisolated_processes(processes)

    def _unisolated_processes(self, processes: list[_Process]) -> list[_Process]:
        """Descendants of the main process, plus anything carrying the instance's marker
        variable (jobs that detached with setsid/nohup are no longer descendants)."""
        ours: set[int] = set()
        if self._proc is not None and self._proc.poll() is None:
            ours.add(self._proc.pid)
        children: dict[int, list[int]] = {}
        for process in processes:
            children.setdefault(process.ppid, []).append(process.pid)
        queue = list(ours)
        while queue:
            for child in children.get(queue.pop(), []):
                ours.add(child)
                queue.append(child)
        marker = f"{_MARKER}={self.state_dir.resolve()}".encode()
        ours.update(p.pid for p in processes if _has_environ_entry(p.pid, marker))
        return [p for p in processes if p.pid in ours]

    def _stop_processes(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if self.isolated:
            self._stop_namespace(proc)
        else:
            self._kill_all()  # the process tree must be collected before its root dies
            proc.kill()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
            if not _wait_for(lambda: not self._kill_all(), STOP_TIMEOUT):
                raise ContainerError(
                    f"instance {self.spec.instance_id}: processes survived destroy"
                )
        finally:
            self._proc = None
            self._init_pid = None
            self._release_namespace()

    def _release_namespace(self) -> None:
        if self._pidns is not None:
            self._pidns.close()
            self._pidns = None

    def _stop_namespace(self, unshare: subprocess.Popen[bytes]) -> None:
        """Kill PID 1: the kernel then kills the whole namespace, and the mounts go with its
        last process. unshare must stay alive to reap PID 1; were it killed, the orphaned PID 1
        would linger as a zombie of the host's init."""
        init = self._init_pid or self._find_init()
        if init is not None and self._pidns is None:
            self._pidns = _HeldNamespace.of(init)
        if init is None or self._pidns is None:
            unshare.kill()  # not forked yet; `--kill-child` takes down a PID 1 forked meanwhile
            return
        # Only while it is still our PID 1: with pid_max at 32768 and tests running side by
        # side, a PID 1 that just exited may have its pid reused by another process already.
        if unshare.poll() is None and self._pidns.holds(init):
            _kill(init)

    def _kill_all(self) -> bool:
        """Kill what is left of the instance; True if anything was."""
        left = self._instance_processes()
        for process in left:
            _kill(process.pid)
        return bool(left)


def _sshd_setenv_token(name: str, value: str) -> str:
    """One quoted NAME=VALUE word of an sshd_config SetEnv line (sshd's argv_split rules)."""
    token = f"{name}={value}"
    if any(char in token for char in "\r\n\0"):
        raise ContainerError(f"env var {name!r} contains a line break, which sshd cannot pass")
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


# sshd binds its port only after we picked it. Ports the kernel hands out for outgoing
# connections (ip_local_port_range, 32768-60999 by default) could be taken meanwhile by any
# client on this busy machine, so pick below that range, at random, and check it is free.
_SSHD_PORTS = range(20000, 32768)


def _bound_socket() -> socket.socket:
    """A socket bound to a free port below the ephemeral range (not listening)."""
    for _ in range(200):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", random.choice(_SSHD_PORTS)))
        except OSError:
            sock.close()
            continue
        return sock
    raise ContainerError("no free port for sshd below the ephemeral range")


def _free_port() -> int:
    with _bound_socket() as probe:
        return probe.getsockname()[1]


def _which(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ContainerError(f"{tool} not found on PATH")
    return path


def _processes() -> list[_Process]:
    result = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        head, _, tail = stat.rpartition(")")
        result.append(_Process(int(entry), int(tail.split()[1]), head.partition("(")[2]))
    return result


class _HeldNamespace:
    """An instance's PID namespace, held open so that its identity stays its own.

    The kernel numbers namespaces like inodes and hands a freed number to the next namespace
    (within a second, here): compared by number alone, the processes of an instance started
    just after this one's namespace died would count as this one's, and its destroy would
    SIGKILL them. A namespace with an open file descriptor is never freed.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        status = os.fstat(fd)
        self._identity = (status.st_dev, status.st_ino)

    @classmethod
    def of(cls, pid: int) -> _HeldNamespace | None:
        try:
            return cls(os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return None

    def holds(self, pid: int) -> bool:
        try:
            status = os.stat(f"/proc/{pid}/ns/pid")
        except OSError:
            return False
        return (status.st_dev, status.st_ino) == self._identity

    def close(self) -> None:
        os.close(self._fd)


def _has_environ_entry(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True
