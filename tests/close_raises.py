"""Snakemake in which closing a job agent's SSH channel raises: ``python -m tests.close_raises
ARGS`` (ARGS as for ``python -m snakemake``).

Why a wrapper: paramiko raises from ``Channel.close`` when the connection breaks under it (the
packetizer's EOFError on a failed socket write, SSHException when a key exchange stalls), and
no switch of the fake marketplace can time a break to the instant between a job's last frame
and that close. So paramiko itself is patched, inside the Snakemake process of a real run:
the first close of each agent channel raises the EOFError a broken socket gives, and says so
on stderr (``MARKER``) so that a test can tell the fault fired. Nothing else changes.
"""

from __future__ import annotations

import sys
from typing import Any

import paramiko

from tests.wrapped import snakemake_patched_by

MARKER = "close-raises: EOFError from closing an agent channel"
AGENT_PROGRAM = "/agent-"  # the agent's command runs snakemake-vastai/agent-<key>.py


def install() -> None:
    exec_command = paramiko.Channel.exec_command
    close = paramiko.Channel.close

    def marked_exec(channel: paramiko.Channel, command: Any) -> None:
        text = command.decode() if isinstance(command, bytes) else str(command)
        channel.agent_stream = AGENT_PROGRAM in text
        exec_command(channel, command)

    def raising_close(channel: paramiko.Channel) -> None:
        if getattr(channel, "agent_stream", False):
            channel.agent_stream = False  # later closes (paramiko's __del__ too) go through
            print(MARKER, file=sys.stderr, flush=True)
            raise EOFError
        close(channel)

    paramiko.Channel.exec_command = marked_exec
    paramiko.Channel.close = raising_close


if __name__ == "__main__":
    snakemake_patched_by(install)
