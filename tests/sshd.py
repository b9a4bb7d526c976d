"""A throwaway OpenSSH server on loopback, so tests exercise real SSH instead of mocks.

Each ``LocalSshd`` has its own directory, host key, authorized_keys and port, and logs in as
root (the tests run as root, like Vast's containers). It can be restarted with a new host key
(a "replaced" machine) and can drop every open connection (a flaky network).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_under(directory: Path) -> list[int]:
    """Processes whose working directory is inside ``directory``: detached jobs escape sshd's
    process tree (setsid, reparented), but they run in their workdir."""
    root = str(directory.resolve())
    found = []
    for pid in _pids():
        with contextlib.suppress(OSError):
            cwd = os.readlink(f"/proc/{pid}/cwd")
            if (cwd == root or cwd.startswith(root + "/")) and pid != os.getpid():
                found.append(pid)
    return found


def kill_processes_under(directory: Path) -> None:
    for pid in processes_under(directory):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class LocalSshd:
    """``with LocalSshd(tmp_path) as sshd:`` runs ``sshd -D`` on 127.0.0.1:``sshd.port``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.authorized_keys = root / "authorized_keys"
        self.host_key = root / "ssh_host_ed25519_key"
        self.log = root / "sshd.log"
        self._config = root / "sshd_config"
        self._proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.authorized_keys.touch(mode=0o600)
        self.new_host_key()

    def __enter__(self) -> LocalSshd:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def authorize(self, pubkey_line: str) -> None:
        with open(self.authorized_keys, "a") as f:
            f.write(pubkey_line.strip() + "\n")

    def new_host_key(self) -> None:
        """Generate a fresh host key; it takes effect at the next start()."""
        for path in (self.host_key, self.host_key.with_suffix(".pub")):
            path.unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)],
            check=True,
        )

    def start(self) -> None:
        """Start sshd and wait until its port accepts connections."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self._config.write_text(
            f"ListenAddress 127.0.0.1:{self.port}\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "MaxStartups 50:30:100\n"
            "MaxSessions 50\n"
            "Subsystem sftp internal-sftp\n"
            "RekeyLimit 64M\n"  # the host starts rekeys often (as the fake's instances do)
        )
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self._config)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sshd exited at start:\n{self.log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not listen on port {self.port}")
            time.sleep(0.02)

    def drop_connections(self) -> None:
        """Kill the per-connection sshd processes, as if the network dropped every session."""
        if self._proc is not None:
            for pid in _children(self._proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop sshd, its sessions and anything still running in its directory. Idempotent."""
        if self._proc is not None:
            sessions = _descendants(self._proc.pid)
            self._proc.kill()
            self._proc.wait()
            self._proc = None
            for pid in sessions:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        kill_processes_under(self.root)

    def restart(self, new_host_key: bool = False) -> None:
        """Stop (dropping every connection) and start again on the same port."""
        self.stop()
        if new_host_key:
            self.new_host_key()
        self.start()


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, process group) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may contain spaces; the fields after it are plain.
    state, ppid, pgrp = text.rsplit(")", 1)[1].split()[:3]
    return state, int(ppid), int(pgrp)


def _children(parent: int) -> list[int]:
    return [pid for pid in _pids() if (info := _stat(pid)) and info[1] == parent]


def process_group(pgid: int) -> list[int]:
    """Live (not zombie) members of a process group."""
    return [pid for pid in _pids() if (info := _stat(pid)) and info[2] == pgid and info[0] != "Z"]


def _descendants(parent: int) -> list[int]:
    children = _children(parent)
    return children + [pid for child in children for pid in _descendants(child)]
