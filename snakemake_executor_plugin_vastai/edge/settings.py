"""The plugin's command line options (``--vastai-*``), kept apart from the executor so that
the resource mapping and the tests can use them without importing Snakemake's executor API.

The field types must stay real ``Optional[X]`` objects (no ``from __future__ import
annotations``, no ``X | None``): Snakemake builds its argparse flags from them at run time."""

from dataclasses import dataclass, field
from typing import Optional

from snakemake_interface_executor_plugins.settings import ExecutorSettingsBase

from snakemake_executor_plugin_vastai.base.redact import hide_in_snakemake_logs
from snakemake_executor_plugin_vastai.market.defaults import (
    DEFAULT_API_URL,
    DEFAULT_DISK_GB,
    DEFAULT_IMAGE,
    DEFAULT_ORDER,
    DEFAULT_RELIABILITY,
)

# Named once: each is both a field's default and the "Default:" of its help.
DEFAULT_BOOT_TIMEOUT = 1800
DEFAULT_POOL_TTL = 300
DEFAULT_BID_FACTOR = 1.25
DEFAULT_DEADMAN = 600
# docs.vast.ai: a start "stuck in the scheduling state for more than 30 seconds" lacks
# resources; the rest is the container's start from its disk, as long as a first boot's login.
DEFAULT_START_TIMEOUT = 120


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    api_key: Optional[str] = field(
        default=None,
        metadata={
            "help": "Vast.ai API key. Default: VAST_API_KEY, else the key file the vastai "
            "CLI writes (~/.config/vastai/vast_api_key or ~/.vast_api_key).",
            "env_var": True,
        },
    )
    api_url: Optional[str] = field(
        default=None,
        metadata={
            "help": "Vast.ai API base URL; tests and the demo point it at the fake "
            f"marketplace. Default: the SDK's VAST_URL, else {DEFAULT_API_URL}.",
            "env_var": True,
        },
    )
    gpu_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "GPU model for jobs that set no gpu_model resource, e.g. RTX_4090 "
            "(underscores stand for spaces). Default: any model."
        },
    )
    max_price: Optional[float] = field(
        default=None,
        metadata={
            "help": "Highest price per instance in $/h (dph_total, storage included). "
            "Default: no cap."
        },
    )
    geolocation: Optional[str] = field(
        default=None,
        metadata={
            "help": "Where instances may run: a region (EU, NA, AS, AF, LC, OC) or country "
            "codes, comma separated (e.g. DE,PL). Default: anywhere."
        },
    )
    disk: int = field(
        default=DEFAULT_DISK_GB,
        metadata={
            "help": "Disk to rent per instance in GB (a job's disk_mb can raise it). "
            f"Default: {DEFAULT_DISK_GB}."
        },
    )
    image: str = field(
        default=DEFAULT_IMAGE,
        metadata={"help": f"Docker image the instances run. Default: {DEFAULT_IMAGE}."},
    )
    reliability: float = field(
        default=DEFAULT_RELIABILITY,
        metadata={
            "help": "Lowest host reliability (0-1) to rent from; 0 disables the filter. "
            f"Default: {DEFAULT_RELIABILITY}."
        },
    )
    no_datacenter: bool = field(
        default=False,
        metadata={
            "help": "Also rent from hobbyist hosts, not only from datacenters. Default: off "
            "(datacenters only)."
        },
    )
    order: str = field(
        default=DEFAULT_ORDER,
        metadata={
            "help": "Offer ranking in vastai syntax, first wins: e.g. dph_total (cheapest) "
            f"or dlperf_usd- (most performance per dollar). Default: {DEFAULT_ORDER}."
        },
    )
    search_query: Optional[str] = field(
        default=None,
        metadata={
            "help": "Extra offer filters in vastai query syntax, e.g. 'cuda_vers>=12.1 "
            "inet_down>=200'. Default: none."
        },
    )
    boot_timeout: int = field(
        default=DEFAULT_BOOT_TIMEOUT,
        metadata={
            "help": "Seconds an instance may take from rent to a working SSH login. "
            f"Default: {DEFAULT_BOOT_TIMEOUT}."
        },
    )
    no_forward_credentials: bool = field(
        default=False,
        metadata={
            "help": "Do not forward this machine's cloud credentials (AWS_*, AZURE_STORAGE_*, "
            "the Google credentials file) to the jobs. What the workflow declares (envvars:, "
            "--envvars, storage plugin settings) still goes. Default: off (they are forwarded)."
        },
    )
    keep_instances: bool = field(
        default=False,
        metadata={
            "help": "Debugging only: leave instances running after the run. They keep "
            "billing until you destroy them (snakemake-vastai reap). Default: off."
        },
    )
    keep_warm: int = field(
        default=0,
        metadata={
            "help": "Seconds that instances idle at the end of a finished or failed run stay "
            "up for the next run in this workflow directory, which adopts them (no rent, no "
            "boot) when its jobs fit them. Meanwhile an instance no job still to run can use "
            "waits out --vastai-pool-ttl instead of going at once. Each one's dead-man "
            "switch ends it at that "
            "deadline if no run comes back; the run's last lines say which stay, until when, "
            "the most they can cost, and that 'snakemake-vastai reap' ends them now. An "
            "interrupted run (Ctrl-C, a signal) keeps nothing. Needs --vastai-deadman. "
            "Default: 0 (every instance is destroyed at the run's end)."
        },
    )
    pool_stop_after: int = field(
        default=0,
        metadata={
            "help": "Seconds an idle instance runs before it is stopped instead: stopped, it "
            "bills only its disk, and the next job of its kind starts it again without a new "
            "rent or image pull (it still waits for the GPU and the container's start). A "
            "stopped instance runs nothing, so no dead-man switch guards it: if the run is "
            "killed, it bills its disk until the next run in this directory or "
            "'snakemake-vastai reap' destroys it. --vastai-pool-ttl still counts its idle "
            "time; instances kept warm past the run are never stopped. Default: 0 (never "
            "stopped)."
        },
    )
    start_timeout: int = field(
        default=DEFAULT_START_TIMEOUT,
        metadata={
            "help": "Seconds a stopped instance may take to run again once a job starts it: "
            "Vast.ai may have given its GPU to another renter meanwhile. Past it the instance "
            "is destroyed and the job rents a fresh one. Default: "
            f"{DEFAULT_START_TIMEOUT}."
        },
    )
    deploy_paths: Optional[str] = field(
        default=None,
        metadata={
            "help": "Comma-separated paths or globs of the source tree to ship, in addition "
            "to the Snakefile, includes, config, scripts and conda files. Default: all "
            "workflow sources."
        },
    )
    max_runtime: int = field(
        default=0,
        metadata={
            "help": "Seconds a job may run on its instance before it is killed; 0: no cap. "
            "Default: 0 (no cap)."
        },
    )
    pool_ttl: int = field(
        default=DEFAULT_POOL_TTL,
        metadata={
            "help": "Seconds a finished instance waits idle for the next job it can serve "
            "before it is destroyed; 0 destroys every instance after its job. Instances no "
            "remaining job can use are destroyed at once, whatever the TTL. Default: "
            f"{DEFAULT_POOL_TTL}."
        },
    )
    pool_max_instances: Optional[int] = field(
        default=None,
        metadata={
            "help": "Most instances alive at once, booting and idle included. Default: --jobs."
        },
    )
    pool_max_lifetime: int = field(
        default=0,
        metadata={
            "help": "Retire an instance after its current job once it is older than this "
            "many seconds; 0: no limit. Default: 0 (no limit)."
        },
    )
    max_total_price: Optional[float] = field(
        default=None,
        metadata={
            "help": "Highest $/h summed over all instances of the run (booting and idle "
            "included): no new rent above it. A job it stops evicts the least recently used "
            "idle instance of another kind, or waits while the run's busy instances may "
            "free room. Default: no cap."
        },
    )
    budget: Optional[float] = field(
        default=None,
        metadata={
            "help": "Dollars the run may spend: no new rent once the spend so far plus 15 "
            "minutes at the running rate would pass it; running jobs finish. Default: no "
            "budget."
        },
    )
    bid_factor: Optional[float] = field(
        default=DEFAULT_BID_FACTOR,
        metadata={
            "help": "Jobs of --preemptible-rules rent interruptible instances, bidding the "
            "offer's minimum bid times this factor (never above --vastai-max-price). Default: "
            f"{DEFAULT_BID_FACTOR}, because a bid at the minimum loses to the next bidder at "
            "once, while a quarter above it still costs far less than on demand."
        },
    )
    deadman: Optional[int] = field(
        default=DEFAULT_DEADMAN,
        metadata={
            "help": "Seconds an instance waits for a sign of life from this run before it "
            "destroys itself (with its own scoped key; yours never goes to a host), so a "
            "killed run or a lost laptop stops billing. The clock starts with the instance's "
            "container, before the first login: an instance this run has not logged in to "
            "within that time is lost to the run. 0: off (as with --vastai-keep-instances). "
            f"Default: {DEFAULT_DEADMAN}, so that a network blip or a short suspend survives "
            "it, and a dead run costs at most the image pull plus ten minutes per instance."
        },
    )
    no_runner: bool = field(
        default=False,
        metadata={
            "help": "Start every job as a fresh process on its instance. By default a resident "
            "runner that has Snakemake imported forks each job, which saves about a second and "
            "as much CPU per job; turn it off to rule it out when debugging. Default: off "
            "(the runner forks each job)."
        },
    )
    no_pack: bool = field(
        default=False,
        metadata={
            "help": "Run one job at a time per instance. By default several jobs share an "
            "instance while its GPUs, cores, RAM and disk suffice (each job gets its own GPUs "
            "through CUDA_VISIBLE_DEVICES). Default: off (jobs share instances)."
        },
    )

    def __post_init__(self) -> None:
        # Made from the command line before the workflow starts and prints that line.
        if self.api_key:
            hide_in_snakemake_logs(self.api_key)
