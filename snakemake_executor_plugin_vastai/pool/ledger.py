"""A crash-safe local record of every instance a run rents, and which runs are still alive.

Why on disk and append-only: after ``kill -9`` nothing in memory survives, yet the instances
keep billing. Every rent is written (and fsynced) *before* the create request is sent, under
the instance's unique label, so the next run or ``snakemake-vastai reap`` can find and destroy
whatever this one left, and the cost summary can be rebuilt from the file alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LABEL_PREFIX = "snakemake-vastai"


def new_run_id() -> str:
    """Short, unique and label-safe: time for humans, random part for uniqueness."""
    return time.strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)


def make_label(run_id: str, tag: str) -> str:
    return f"{LABEL_PREFIX}:{run_id}:{tag}"[:256]


def run_id_of(label: str) -> str | None:
    """The run that rented an instance, from its label; None for labels that are not ours."""
    parts = label.split(":")
    return parts[1] if len(parts) >= 3 and parts[0] == LABEL_PREFIX else None


def billed_dollars(start: float, end: float, dph_total: float) -> float:
    """Vast.ai bills an instance from rent to destroy at its $/h."""
    return max(0.0, end - start) * dph_total / 3600.0


@dataclass
class InstanceRecord:
    """What the ledger knows of one rent, folded from its events."""

    label: str
    run_id: str
    offer_id: int
    dph_total: float
    requested_at: float
    instance_id: int | None = None
    created_at: float | None = None  # when the create's answer came: Vast.ai bills from here
    running_at: float | None = None
    # Where this record's bill ended: the destroy sent, or the next run adopting it.
    ended_at: float | None = None
    jobs: list[str] = field(default_factory=list)
    data_dollars: float = 0.0  # its bandwidth, recorded when it was destroyed (or kept)
    key: str = ""  # the run key (keys/<key>) that logs in to it: its renter's, or kept along
    kept: dict[str, Any] | None = None  # kept warm past its run: what adopting it needs
    handed_to: str | None = None  # the label it took when a later run adopted it
    stopped_at: float | None = None  # stopped by its run, and not started again since
    stopped_seconds: float = 0.0  # time it spent stopped before that
    storage_dph: float = 0.0  # what its disk costs per hour: all it bills while stopped
    adopted_from: str | None = None  # the label it had in the run that kept it

    def __post_init__(self) -> None:
        self.key = self.key or self.run_id

    @property
    def open(self) -> bool:
        return self.ended_at is None

    def kept_until(self) -> float | None:
        """The keep-warm deadline of an instance kept past its run and not taken over; None
        also when the record cannot be read (its instance is then no longer spared)."""
        if not self.kept or not self.open:
            return None
        try:
            return float(self.kept["deadline"])
        except (KeyError, TypeError, ValueError):
            return None

    def cost(self, now: float) -> float:
        """As Vast.ai bills: from the create (from the request when its answer was lost: the
        most it can be) to the confirmed destroy, or ``now`` while it may bill, plus its
        bandwidth."""
        start = self.created_at or self.requested_at
        end = self.ended_at or now
        time_cost = billed_dollars(start, end, self.dph_total)
        stopped = self.stopped_seconds + max(0.0, end - (self.stopped_at or end))
        saved = billed_dollars(0.0, stopped, max(0.0, self.dph_total - self.storage_dph))
        return time_cost - saved + self.data_dollars


class Ledger:
    """Append-only JSON lines under ``.snakemake/vastai/``; shared by all runs of a workdir."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "ledger.jsonl"
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)

    def rent_requested(self, label: str, run_id: str, offer_id: int, dph_total: float) -> None:
        self._append(
            {"event": "rent", "label": label, "run": run_id, "offer": offer_id, "dph": dph_total}
        )

    def rented(self, label: str, instance_id: int) -> None:
        self._append({"event": "rented", "label": label, "instance": instance_id})

    def running(self, label: str) -> None:
        self._append({"event": "running", "label": label})

    def job_ran(self, label: str, job: str) -> None:
        self._append({"event": "job", "label": label, "job": job})

    def price_changed(self, label: str, dph_total: float) -> None:
        self._append({"event": "price", "label": label, "dph": dph_total})

    def data_billed(self, label: str, dollars: float) -> None:
        self._append({"event": "data", "label": label, "dollars": dollars})

    def destroyed(self, label: str, ended_at: float | None = None) -> None:
        """Gone; ``ended_at``: when the destroy that ended it was sent, where Vast.ai's bill
        ends (the confirmation, this event's time, comes later)."""
        event: dict[str, Any] = {"event": "destroyed", "label": label}
        if ended_at is not None:
            event["ended"] = ended_at
        self._append(event)

    def stopped(self, label: str, storage_dph: float, at: float) -> None:
        """Stopped by its run at ``at``: from then on it bills ``storage_dph``, its disk."""
        self._append({"event": "stopped", "label": label, "storage": storage_dph, "at": at})

    def started(self, label: str, at: float) -> None:
        """Running again since ``at`` (its machine's GPU its own again): its whole price."""
        self._append({"event": "started", "label": label, "at": at})

    def kept(self, label: str, details: dict[str, Any]) -> None:
        """Left up past its run until ``details["deadline"]``, for the next run to adopt."""
        self._append({"event": "kept", "label": label, "kept": details})

    def adopt(self, label: str, new_label: str, run_id: str) -> bool:
        """Take over a kept instance for ``run_id`` under ``new_label``; False when it is
        no longer kept (another run adopted it first, or it is gone). Checked and written
        under the file's lock, so two runs never adopt the same instance."""
        event = {"event": "adopted", "label": label, "new_label": new_label, "run": run_id}

        def still_kept(records: dict[str, InstanceRecord]) -> bool:
            record = records.get(label)
            return record is not None and record.kept_until() is not None

        return self._append(event, only_if=still_kept)

    def records(self) -> list[InstanceRecord]:
        """Every rent ever recorded here, oldest first."""
        return list(_fold(self._events()).values())

    def open_records(self) -> list[InstanceRecord]:
        return [record for record in self.records() if record.open]

    def _append(
        self,
        event: dict[str, Any],
        only_if: Callable[[dict[str, InstanceRecord]], bool] | None = None,
    ) -> bool:
        """Write one event (fsynced); with ``only_if``, only when the records as read under
        the file's lock allow it. True when written."""
        event["t"] = time.time()
        line = json.dumps(event, separators=(",", ":")) + "\n"
        with self._lock, open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            if only_if is not None and not only_if(_fold(self._events())):
                return False
            size = handle.seek(0, os.SEEK_END)
            if size:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    # A crash tore the last line: end it, or this event would be glued to it
                    # and lost with it.
                    line = "\n" + line
            handle.write(line.encode("utf-8"))  # append mode: always at the end
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _events(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        events = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write; the rest is still good
        return events


def _fold(events: list[dict[str, Any]]) -> dict[str, InstanceRecord]:
    """The records the events make, by label, oldest first."""
    by_label: dict[str, InstanceRecord] = {}
    for event in events:
        label = event.get("label", "")
        if event["event"] == "rent":
            by_label[label] = InstanceRecord(
                label=label,
                run_id=event["run"],
                offer_id=event["offer"],
                dph_total=event["dph"],
                requested_at=event["t"],
            )
            continue
        record = by_label.get(label)
        if record is None:
            continue
        if event["event"] == "adopted":
            by_label[event["new_label"]] = _adopted(record, event)
        else:
            _apply(record, event)
    return by_label


def _apply(record: InstanceRecord, event: dict[str, Any]) -> None:
    kind = event["event"]
    if kind == "rented":
        record.instance_id = event["instance"]
        record.created_at = event["t"]
    elif kind == "running":
        record.running_at = event["t"]
    elif kind == "job":
        record.jobs.append(event["job"])
    elif kind == "price":
        record.dph_total = event["dph"]
    elif kind == "data":
        record.data_dollars = event["dollars"]
    elif kind == "kept":
        record.kept = event["kept"]
    elif kind == "stopped":
        record.stopped_at, record.storage_dph = event.get("at", event["t"]), event["storage"]
    elif kind == "started" and record.stopped_at is not None:
        record.stopped_seconds += event.get("at", event["t"]) - record.stopped_at
        record.stopped_at = None
    elif kind == "destroyed" and record.handed_to is None:  # a handed record's bill ended
        record.ended_at = event.get("ended", event["t"])


def _adopted(kept: InstanceRecord, event: dict[str, Any]) -> InstanceRecord:
    """A later run took the instance over: the keeping run's record ends there (its bill
    with it), and the instance goes on under the new label, billed to the new run."""
    kept.ended_at = event["t"]
    kept.handed_to = event["new_label"]
    return InstanceRecord(
        label=event["new_label"],
        run_id=event["run"],
        offer_id=kept.offer_id,
        dph_total=kept.dph_total,
        requested_at=event["t"],
        instance_id=kept.instance_id,
        created_at=event["t"],
        running_at=event["t"],
        key=kept.key,
        adopted_from=kept.label,
    )


def recorded(directory: Path) -> list[InstanceRecord]:
    """Every rent recorded in ``directory``, read without creating it: looking (``status``,
    ``cost``) must leave a workdir as it was."""
    return Ledger(directory).records() if (directory / "ledger.jsonl").is_file() else []


class RunLock:
    """Held by a live run for its whole life: a run whose lock can be taken is dead.

    ``flock`` is released by the kernel when the process dies, even by ``kill -9``, so a
    later run can tell an orphan from an instance that another live run still uses.
    """

    def __init__(self, directory: Path, run_id: str) -> None:
        self.path = directory / "runs" / f"{run_id}.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "w")  # noqa: SIM115 (held open for the run's life)
        fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._handle.write(str(os.getpid()))
        self._handle.flush()

    def release(self) -> None:
        # The file stays: an unlockable lock file is how later runs recognise a dead run.
        if not self._handle.closed:
            self._handle.close()


def run_is_alive(directory: Path, run_id: str) -> bool:
    """True while the run holds its lock. A run unknown to this workdir counts as alive:
    it may be another user's or another machine's, so its instances are not ours to touch."""
    path = directory / "runs" / f"{run_id}.lock"
    if not path.exists():
        return True
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
