"""``snakemake-vastai``: look at and clean up after runs from the shell.

- ``status``: this workdir's runs and what Vast.ai lists under the plugin's label.
- ``reap``: destroy instances of runs that are dead (``--all``: every instance carrying the
  plugin's label, e.g. after ``--vastai-keep-instances``).
- ``cost``: what each run of this workdir cost, from the local ledger alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from snakemake_executor_plugin_vastai.ledger import Ledger, run_id_of, run_is_alive
from snakemake_executor_plugin_vastai.marketplace import (
    Marketplace,
    MarketplaceError,
    resolve_api_key,
    resolve_api_url,
)
from snakemake_executor_plugin_vastai.reaper import find_orphans, reap_orphans


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    state_dir = Path(args.workdir) / ".snakemake" / "vastai"
    try:
        return args.command(args, state_dir)
    except MarketplaceError as error:
        print(f"snakemake-vastai: {error}", file=sys.stderr)
        return 1


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="snakemake-vastai", description=__doc__.split("\n")[0])
    top.add_argument("--workdir", default=".", help="the workflow directory (default: .)")
    top.add_argument("--api-key", help="as --vastai-api-key (default: VAST_API_KEY, key file)")
    top.add_argument("--api-url", help="as --vastai-api-url (default: VAST_URL, Vast.ai)")
    commands = top.add_subparsers(required=True, metavar="COMMAND")
    status = commands.add_parser("status", help="runs of this workdir and their live instances")
    status.set_defaults(command=show_status)
    reap = commands.add_parser("reap", help="destroy instances left by dead runs")
    reap.add_argument("--all", action="store_true", help="every instance with our label")
    reap.add_argument("--dry-run", action="store_true", help="only say what would go")
    reap.set_defaults(command=reap_instances)
    cost = commands.add_parser("cost", help="what each run of this workdir cost")
    cost.set_defaults(command=show_cost)
    return top


def market(args: argparse.Namespace) -> Marketplace:
    return Marketplace(resolve_api_key(args.api_key), resolve_api_url(args.api_url))


def show_status(args: argparse.Namespace, state_dir: Path) -> int:
    listed = [i for i in market(args).list_instances() if run_id_of(i.label)]
    if not listed:
        print("No instance with the snakemake-vastai label is running.")
        return 0
    print(f"{'instance':>10}  {'status':<10} {'$/h':>7} {'age':>8}  {'run':<8} label")
    now = time.time()
    for info in listed:
        run_id = run_id_of(info.label) or ""
        alive = "alive" if run_is_alive(state_dir, run_id) else "dead"
        age = f"{(now - info.start_date) / 60:.0f} min" if info.start_date else "?"
        print(
            f"{info.id:>10}  {info.actual_status or 'creating':<10} {info.dph_total:>7.3f} "
            f"{age:>8}  {alive:<8} {info.label}"
        )
    return 0


def reap_instances(args: argparse.Namespace, state_dir: Path) -> int:
    api = market(args)
    ledger = Ledger(state_dir)
    if not args.all:
        if args.dry_run:
            doomed = find_orphans(api.list_instances(), state_dir, own_run=None)
            targets = [(o.instance_id, o.label) for o in doomed]
        else:
            orphans = reap_orphans(api, ledger, state_dir, own_run=None)
            targets = [(o.instance_id, o.label) for o in orphans]
    else:
        targets = [(i.id, i.label) for i in api.list_instances() if run_id_of(i.label)]
        if not args.dry_run:
            targets = [t for t in targets if destroy_one(api, ledger, *t)]
    verb = "Would destroy" if args.dry_run else "Destroyed"
    for instance_id, label in targets:
        print(f"{verb} instance {instance_id} ({label})")
    if not targets:
        print("Nothing to reap.")
    return 0


def destroy_one(api: Marketplace, ledger: Ledger, instance_id: int, label: str) -> bool:
    """One destroy of ``reap --all``; a failure is reported and the others still go."""
    try:
        api.destroy(instance_id)
    except MarketplaceError as error:
        print(f"Could not destroy instance {instance_id} ({label}): {error}", file=sys.stderr)
        return False
    ledger.destroyed(label)
    return True


def show_cost(args: argparse.Namespace, state_dir: Path) -> int:
    records = Ledger(state_dir).records()
    if not records:
        print(f"No runs recorded under {state_dir}.")
        return 0
    by_run = defaultdict(list)
    for record in records:
        by_run[record.run_id].append(record)
    now = time.time()
    print(f"{'run':<24} {'instances':>9} {'jobs':>5} {'open':>5} {'$':>10}")
    total = 0.0
    for run_id, rents in by_run.items():
        rented = [r for r in rents if r.instance_id is not None]
        dollars = sum(r.cost(now) for r in rented)
        total += dollars
        still_open = sum(1 for r in rented if r.open)
        jobs = sum(len(r.jobs) for r in rented)
        print(f"{run_id:<24} {len(rented):>9} {jobs:>5} {still_open:>5} {dollars:>10.4f}")
    print(f"{'total':<24} {'':>9} {'':>5} {'':>5} {total:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
