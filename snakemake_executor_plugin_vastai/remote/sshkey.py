"""The run's own SSH key: made fresh for every run, so no long-lived key of the user's is
ever attached to a rented machine. It lives on disk (mode 0600) under ``.snakemake/`` while
the run lasts, so the user can log in to an instance while debugging, and goes with the run
(kept while an instance kept warm past the run may accept it: see ``pool/keeping.py``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True)
class RunKey:
    private_path: Path
    public_line: str
    private_pem: str  # OpenSSH format; remote.py turns it into a paramiko key

    @classmethod
    def create(cls, directory: Path, name: str) -> RunKey:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        path = directory / name
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(private)
        public_line = f"{public.decode()} {name}"
        (directory / f"{name}.pub").write_text(public_line + "\n")
        return cls(private_path=path, public_line=public_line, private_pem=private.decode())

    @classmethod
    def load(cls, directory: Path, name: str) -> RunKey:
        """An earlier run's key, to log in to an instance it kept warm."""
        path = directory / name
        public_line = (directory / f"{name}.pub").read_text().strip()
        return cls(private_path=path, public_line=public_line, private_pem=path.read_text())

    def remove(self) -> None:
        """Forget the key: no instance of the run is left to log in to."""
        self.private_path.unlink(missing_ok=True)
        self.private_path.with_name(f"{self.private_path.name}.pub").unlink(missing_ok=True)


def remove_keys_except(directory: Path, wanted: set[str]) -> list[str]:
    """Delete every run key in ``directory`` but the ``wanted`` ones; the names deleted."""
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        name = path.name.removesuffix(".pub")
        if name not in wanted:
            path.unlink(missing_ok=True)
            removed.append(name)
    return sorted(set(removed))
