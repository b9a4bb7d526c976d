"""``snakemake-vastai``: look at and clean up after the plugin's runs from the shell.

Why a command of its own: after ``kill -9``, a lost laptop or ``--vastai-keep-instances``,
instances may still bill, and only the workdir's ledger and the instances' labels tell whose
they are. It reads the API key and URL from the plugin's own sources, in the plugin's order,
and every error is one line on stderr with exit status 1 (2 for a usage mistake).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from snakemake_executor_plugin_vastai.base.errors import UserError, VastaiError
from snakemake_executor_plugin_vastai.base.logger import SNAKEMAKE_LOGGER
from snakemake_executor_plugin_vastai.cli.preview import add_command
from snakemake_executor_plugin_vastai.edge.summary import KILLED, recorded_outcome
from snakemake_executor_plugin_vastai.market.defaults import DEFAULT_API_URL
from snakemake_executor_plugin_vastai.market.marketplace import (
    InstanceInfo,
    Marketplace,
    MarketplaceError,
    helper_market,
)
from snakemake_executor_plugin_vastai.pool.ledger import (
    InstanceRecord,
    Ledger,
    recorded,
    run_id_of,
    run_is_alive,
)
from snakemake_executor_plugin_vastai.pool.reaper import find_orphans, reap_orphans

PROG = "snakemake-vastai"
DESCRIPTION = "Look at and clean up after the Vast.ai runs of a Snakemake workflow directory."
EPILOG = (
    "The API key comes from --api-key, else SNAKEMAKE_VASTAI_API_KEY, else VAST_API_KEY, else "
    "the key file of the vastai CLI (vastai set api-key); the API URL from --api-url, else "
    f"SNAKEMAKE_VASTAI_API_URL, else VAST_URL, else {DEFAULT_API_URL}. The plugin reads the "
    "same sources in the same order."
)
GONE = "gone"  # what the status says of an instance Vast.ai no longer lists
RUNNING = "running"  # a run that holds its lock
ENDED = "ended"  # a run whose summary does not say how it ended (an older plugin wrote it)
UNKNOWN_RUN = "unknown"  # a run this workdir never recorded


class HelperError(UserError):
    """A mistake in how the helper was called that argparse cannot see (a missing workdir)."""


class Parser(argparse.ArgumentParser):
    """Usage mistakes as one line on stderr, like every other error of the helper."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with plugin_errors_on_stderr():
            return args.command(args, state_dir_of(args.workdir))
    except (VastaiError, OSError) as error:
        fail(str(error))
        return 1
    except KeyboardInterrupt:
        fail("interrupted")
        return 130


def parser() -> argparse.ArgumentParser:
    top = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    top.add_argument(
        "--workdir", default=".", metavar="DIR", help="the workflow directory (default: .)"
    )
    top.add_argument(
        "--api-key", metavar="KEY", help="Vast.ai API key (as the plugin's --vastai-api-key)"
    )
    top.add_argument(
        "--api-url", metavar="URL", help="Vast.ai API URL (as the plugin's --vastai-api-url)"
    )
    commands = top.add_subparsers(required=True, metavar="COMMAND", title="commands")
    add_subcommand(
        commands,
        "status",
        "this workdir's runs (running, finished, failed or killed) and what Vast.ai says of "
        "their instances",
        show_status,
    )
    reap = add_subcommand(
        commands,
        "reap",
        "destroy the instances of this workdir's dead runs, those kept warm for the next "
        "run included (a live run keeps its own)",
        reap_instances,
    )
    reap.add_argument(
        "--all",
        action="store_true",
        help="destroy every instance with the plugin's label, whatever its run or workdir "
        "(e.g. after --vastai-keep-instances)",
    )
    reap.add_argument(
        "--dry-run", action="store_true", help="only list what would go; change nothing"
    )
    add_subcommand(
        commands,
        "cost",
        "what each run of this workdir cost, from its ledger, counted as Vast.ai bills "
        "(each instance from its create to its destroy, plus its bandwidth)",
        show_cost,
    )
    add_command(commands)
    return top


def add_subcommand(
    commands: argparse._SubParsersAction,
    name: str,
    summary: str,
    command: Callable[[argparse.Namespace, Path], int],
) -> argparse.ArgumentParser:
    """A subcommand whose help is ``summary`` both in the command list and in its own help."""
    sub = commands.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.")
    sub.set_defaults(command=command)
    return sub


def fail(message: str) -> None:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)


def state_dir_of(workdir: str) -> Path:
    """The plugin's state folder of ``workdir``, which must exist (it need not have one)."""
    path = Path(workdir)
    if not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist"
        raise HelperError(f"--workdir {workdir} {problem}.")
    return path / ".snakemake" / "vastai"


@contextmanager
def plugin_errors_on_stderr() -> Iterator[None]:
    """The plugin's modules log to Snakemake's logger, which has no handler here: show their
    errors (a destroy that failed) the helper's way, and leave progress to its own output."""
    logger = logging.getLogger(f"{SNAKEMAKE_LOGGER}.vastai")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


# -- status -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusRow:
    """One instance of a run as the ledger and Vast.ai see it (or a run that rented none)."""

    run_id: str
    run_state: str  # RUNNING, how it ended (finished, failed, killed, ENDED) or UNKNOWN_RUN
    instance_id: int | None
    says: str  # Vast.ai's status of the instance, GONE once unlisted, "" for no instance
    dph_total: float | None
    jobs: int | None
    label: str
    kept_until: float | None = None  # kept warm for the next run until then

    @property
    def reapable(self) -> bool:
        """An instance Vast.ai still lists, of a run of this workdir that is over (and not
        kept warm for the next run: its deadline ends it)."""
        over = self.run_state not in (RUNNING, UNKNOWN_RUN)
        return over and self.says not in ("", GONE) and self.kept_until is None

    def cells(self) -> list[str]:
        says = self.says or "-"
        if self.kept_until is not None and self.says not in ("", GONE):
            says += f", kept warm until {clock(self.kept_until)}"
        return [
            self.run_id,
            self.run_state,
            str(self.instance_id) if self.instance_id is not None else "-",
            says,
            f"{self.dph_total:.3f}" if self.dph_total is not None else "-",
            str(self.jobs) if self.jobs is not None else "-",
            self.label or "(nothing rented)",
        ]


HEADER = ["run", "state", "instance", "Vast.ai", "$/h", "jobs", "label"]


def show_status(args: argparse.Namespace, state_dir: Path) -> int:
    listed = {
        info.label: info
        for info in labelled(helper_market(args.api_key, args.api_url).list_instances())
    }
    records = recorded(state_dir)
    rows = [*recorded_rows(records, listed, state_dir), *unrecorded_rows(records, listed)]
    if not rows:
        print(f"No runs recorded in {state_dir}, and no instance with the plugin's label.")
        return 0
    print(f"Runs of {Path(args.workdir).resolve()} and their instances:")
    print(table([HEADER, *(row.cells() for row in rows)]))
    if any(row.run_state == UNKNOWN_RUN for row in rows):
        print(
            "unknown: a run this workdir never recorded (another workdir or machine); reap "
            "leaves its instances alone, reap --all destroys them."
        )
    reapable = sum(row.reapable for row in rows)
    if reapable:
        print(reap_advice(reapable, args.workdir))
    kept = [r for r in rows if r.kept_until is not None and r.says not in ("", GONE)]
    if kept:
        print(kept_advice(kept, records, args.workdir))
    return 0


def recorded_rows(
    records: list[InstanceRecord], listed: dict[str, InstanceInfo], state_dir: Path
) -> Iterator[StatusRow]:
    """The workdir's runs in the order they started; each instance as Vast.ai lists it."""
    for run_id, rents in by_run(records).items():
        state = run_state(state_dir, run_id)
        created = [r for r in rents if r.instance_id is not None or r.label in listed]
        if not created:
            yield StatusRow(run_id, state, None, "", None, None, "")
        for record in created:
            info = listed.get(record.label)
            yield StatusRow(
                run_id,
                state,
                info.id if info else record.instance_id,
                vast_says(info),
                info.dph_total if info else record.dph_total,
                len(record.jobs),
                record.label,
                record.kept_until(),
            )


def unrecorded_rows(
    records: list[InstanceRecord], listed: dict[str, InstanceInfo]
) -> Iterator[StatusRow]:
    """Instances with the plugin's label that this workdir's ledger does not know."""
    known = {record.label for record in records}
    for label, info in listed.items():
        if label not in known:
            run_id = run_id_of(label) or ""
            yield StatusRow(
                run_id, UNKNOWN_RUN, info.id, vast_says(info), info.dph_total, None, label
            )


def run_state(state_dir: Path, run_id: str) -> str:
    """Running while the run holds its lock; then what its summary says of its end. The
    summary is written by the run's teardown, so a run without one was killed before it."""
    if run_is_alive(state_dir, run_id):
        return RUNNING
    outcome = recorded_outcome(state_dir, run_id)
    if outcome is None:
        return KILLED
    return outcome or ENDED


def by_run(records: Iterable[InstanceRecord]) -> dict[str, list[InstanceRecord]]:
    """The ledger's records per run, runs in the order they first rented."""
    runs: dict[str, list[InstanceRecord]] = defaultdict(list)
    for record in records:
        runs[record.run_id].append(record)
    return runs


def vast_says(info: InstanceInfo | None) -> str:
    """What Vast.ai says of an instance, in one word."""
    if info is None:
        return GONE
    return info.actual_status or "creating"


def table(rows: list[list[str]]) -> str:
    """Columns aligned, numbers to the right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = {HEADER.index(name) for name in ("instance", "$/h", "jobs")}
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def reap_command(workdir: str) -> str:
    return f"{PROG} reap" if workdir == "." else f"{PROG} --workdir {shlex.quote(workdir)} reap"


def kept_advice(kept: list[StatusRow], records: list[InstanceRecord], workdir: str) -> str:
    """What the instances kept warm have cost so far, and how to end them before their
    deadline."""
    labels = {row.label for row in kept}
    now = time.time()
    dollars = sum(r.cost(now) for r in records if r.label in labels)
    return (
        f"{len(kept)} instance(s) kept warm for the next run, billed ${dollars:.4f} so far to "
        f"the run that kept them; each ends at its deadline, or now with "
        f"'{reap_command(workdir)}'."
    )


def reap_advice(count: int, workdir: str) -> str:
    """The command that destroys what dead runs left, written for this workdir."""
    command = reap_command(workdir)
    what = "1 instance of a dead run is" if count == 1 else f"{count} instances of dead runs are"
    it = "it" if count == 1 else "them"
    return f"{what} still on Vast.ai and billing: run '{command}' to destroy {it}."


# -- reap -------------------------------------------------------------------------------------


def reap_instances(args: argparse.Namespace, state_dir: Path) -> int:
    api = helper_market(args.api_key, args.api_url)
    if args.all:
        targets = [(i.id, i.label) for i in labelled(api.list_instances())]
        if not args.dry_run:
            ledger = Ledger(state_dir)
            targets = [t for t in targets if destroy_one(api, ledger, *t)]
    elif args.dry_run:
        records = recorded(state_dir)
        doomed = find_orphans(api.list_instances(), state_dir, None, records, with_kept=True)
        targets = [(o.instance_id, o.label) for o in doomed]
    else:
        ledger = Ledger(state_dir)
        orphans = reap_orphans(api, ledger, state_dir, own_run=None, with_kept=True)
        targets = [(o.instance_id, o.label) for o in orphans]
    verb = "Would destroy" if args.dry_run else "Destroyed"
    for instance_id, label in targets:
        print(f"{verb} instance {instance_id} ({label})")
    if not targets:
        print("Nothing to reap.")
    return 0


def labelled(instances: Iterable[InstanceInfo]) -> list[InstanceInfo]:
    return [info for info in instances if run_id_of(info.label)]


def destroy_one(api: Marketplace, ledger: Ledger, instance_id: int, label: str) -> bool:
    """One destroy of ``reap --all``; a failure is reported and the others still go."""
    try:
        ended_at = api.destroy(instance_id)
    except MarketplaceError as error:
        fail(f"Could not destroy instance {instance_id} ({label}): {error}")
        return False
    ledger.destroyed(label, ended_at)
    return True


# -- cost -------------------------------------------------------------------------------------


def show_cost(args: argparse.Namespace, state_dir: Path) -> int:
    records = recorded(state_dir)
    if not records:
        print(f"No runs recorded in {state_dir}.")
        return 0
    now = time.time()
    print(f"{'run':<24} {'instances':>9} {'jobs':>5} {'open':>5} {'data $':>10} {'$':>10}")
    total = 0.0
    for run_id, rents in by_run(records).items():
        rented = [r for r in rents if r.instance_id is not None]
        dollars = sum(r.cost(now) for r in rented)
        data = sum(r.data_dollars for r in rented)
        total += dollars
        still_open = sum(1 for r in rented if r.open)
        jobs = sum(len(r.jobs) for r in rented)
        print(
            f"{run_id:<24} {len(rented):>9} {jobs:>5} {still_open:>5} {data:>10.4f} "
            f"{dollars:>10.4f}"
        )
    print(f"{'total':<24} {'':>9} {'':>5} {'':>5} {'':>10} {total:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
