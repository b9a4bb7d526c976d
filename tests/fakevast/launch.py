"""The body of ``PUT /asks/{id}/``: validated into a LaunchSpec, or a 400 like the real API's.

Every SDK version's create request is accepted: env as a dict (SDK >= 1.5) or as a raw Docker
flag string (SDK <= 1.5.0), runtype given, combined (``"ssh_direc ssh_proxy"``) or absent.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ApiError, api_error

MIN_DISK_GB = 8.0
MAX_LABEL = 256
MAX_ONSTART = 4048
MAX_ONSTART_AND_ARGS = 4096
MIN_PRICE, MAX_PRICE = 0.001, 128.0
_SSH_WORDS = frozenset(
    {"ssh", "ssh_proxy", "ssh_direc", "ssh_direct", "jupyter", "jupyter_proxy"}
    | {"jupyter_direc", "jupyter_direct"}
)
_DIRECT_WORDS = frozenset({"ssh_direc", "ssh_direct"})
# registry[:port]/name[/name...][:tag][@digest]; a tag may start with "@", as in
# "vastai/pytorch:@vastai-automatic-tag".
_IMAGE = re.compile(
    r"^(?:[a-z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[\w@][\w.@-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)
_PORT_CHARS = frozenset("0123456789:tcp/udp")
_VOLUME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:./_")
_NETWORK_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


@dataclass(frozen=True)
class LaunchSpec:
    """What a create asked for, after the server's defaults are applied."""

    image: str
    disk: float
    env: dict[str, str]  # as the API stores it: variables plus "-p 8080:8080"-style flag keys
    runtype: str
    ssh: bool
    wants_direct: bool
    onstart: str | None
    args: list[str] | None
    label: str | None
    price: float | None

    @property
    def variables(self) -> dict[str, str]:
        """The environment the container sees: Docker flag keys are not variables."""
        return {k: v for k, v in self.env.items() if not k.startswith("-")}


def docker_flags_to_env(flags: str) -> dict[str, str]:
    """Parse ``"-e A=1 -p 22:22 -h name"`` the way SDK >= 1.5 does client-side."""
    env: dict[str, str] = {}
    words = iter(shlex.split(flags))
    for flag in words:
        if flag not in ("-e", "-p", "-h", "-v", "-n"):
            continue
        value = next(words, None)
        if value is None:
            break
        if flag == "-e":
            name, sep, text = value.partition("=")
            if sep:
                env[name] = text.strip("'\"")
        elif flag == "-p" and set(value) <= _PORT_CHARS:
            env[f"-p {value}"] = "1"
        elif flag == "-v" and set(value) <= _VOLUME_CHARS:
            env[f"-v {value}"] = "1"
        elif flag == "-n" and set(value) <= _NETWORK_CHARS:
            env[f"-n {value}"] = "1"
        elif flag == "-h":
            env["-h"] = value
    return env


def parse_launch(body: Mapping[str, Any], offer: Mapping[str, Any]) -> LaunchSpec:
    """Validate a create body against the offer it rents; raises ApiError (400)."""
    ask_id = offer["id"]

    def invalid(detail: str, error: str = "invalid_args") -> ApiError:
        return api_error(400, error, f"error 400/3467: Invalid args: {detail}", ask_id=ask_id)

    if body.get("template_hash_id"):
        raise invalid("templates are not supported by this fake; send image and runtype")
    image = body.get("image")
    if not isinstance(image, str) or not _IMAGE.match(image):
        raise invalid(f"image {image!r} is not a valid docker image reference")
    disk = body.get("disk", 10)
    if isinstance(disk, bool) or not isinstance(disk, int | float) or disk < MIN_DISK_GB:
        raise invalid(f"disk must be a number of at least {MIN_DISK_GB:g} GB, got {disk!r}")
    if disk > offer["disk_space"]:
        raise invalid(f"disk {disk:g} GB exceeds the machine's {offer['disk_space']:g} GB")
    label = body.get("label")
    if label is not None and (not isinstance(label, str) or len(label) > MAX_LABEL):
        raise invalid(f"label must be a string of at most {MAX_LABEL} characters")
    env = _env(body.get("env"), invalid)
    onstart = body.get("onstart")
    if onstart is not None and (not isinstance(onstart, str) or len(onstart) > MAX_ONSTART):
        raise invalid(f"onstart must be a string of at most {MAX_ONSTART} characters")
    args = body.get("args")
    if args is not None and not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        raise invalid("args must be a list of strings")
    if len(onstart or "") + sum(len(a) for a in args or []) > MAX_ONSTART_AND_ARGS:
        raise invalid(f"onstart and args together exceed {MAX_ONSTART_AND_ARGS} characters")
    runtype = body.get("runtype") or ("args" if args else "ssh")
    words = runtype.split() if isinstance(runtype, str) else [repr(runtype)]
    if words != ["args"] and not set(words) <= _SSH_WORDS:
        raise invalid(f"unknown runtype {runtype!r}")
    price = body.get("price")
    if price is not None:
        if isinstance(price, bool) or not isinstance(price, int | float):
            raise invalid(f"price must be a number, got {price!r}", "invalid_price")
        if not MIN_PRICE <= price <= MAX_PRICE or price < offer["min_bid"]:
            low = max(MIN_PRICE, offer["min_bid"])
            raise invalid(f"bid price {price} is outside [{low}, {MAX_PRICE}]", "invalid_price")
    return LaunchSpec(
        image=image,
        disk=float(disk),
        env=env,
        runtype=runtype,
        ssh=words != ["args"],
        wants_direct=bool(_DIRECT_WORDS & set(words)),
        onstart=onstart,
        args=args,
        label=label,
        price=None if price is None else float(price),
    )


def _env(value: Any, invalid: Callable[[str], ApiError]) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            return docker_flags_to_env(value)
        except ValueError as error:
            raise invalid(f"env string cannot be parsed: {error}") from None
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: v if isinstance(v, str) else str(v) for k, v in value.items()}
    raise invalid("env must be an object or a docker flag string")
