"""Small files that every process of one API key and URL on this machine shares, under the
user's cache directory (the pacer's book of calls, the shelf of recent offer searches).

Why one place: each is named by a digest of the URL and the key, never the key itself, and
each is read and rewritten whole under an exclusive lock, so two workflows and the helper
command of the same key see one another's writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def key_file(api_url: str, api_key: str, kind: str) -> Path:
    """A file this key and URL share on this machine, under the user's cache directory,
    named by ``kind`` and a digest (never the key)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    digest = hashlib.sha256(f"{api_url.rstrip('/')}\n{api_key}".encode()).hexdigest()[:20]
    return Path(cache) / "snakemake-vastai" / f"{kind}-{digest}.json"


@contextlib.contextmanager
def locked_json(path: Path) -> Iterator[dict[str, Any]]:
    """A small JSON document read and written back under an exclusive file lock; a damaged
    or unreadable one starts afresh (what these files hold may always be forgotten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        try:
            document = json.loads(handle.read() or "{}")
        except ValueError:
            document = {}
        if not isinstance(document, dict):
            document = {}
        yield document
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(document))
        handle.flush()
