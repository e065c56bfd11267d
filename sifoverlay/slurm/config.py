"""The plugin's plugstack keys, read by the Python side (Prolog, Epilog, sweeper).

The C plugin and this module parse the same line of plugstack.conf with the same strict
rules, so the two halves can never disagree about journal_dir, runtime_dir or the image
roots: ``required /usr/lib/sifoverlay/sifoverlay_spank.so journal_dir=... image_roots=a:b``.

Where the file is: ``$SIFOVERLAY_PLUGSTACK`` if set, else ``plugstack.conf`` beside
``$SLURM_CONF`` (slurmd passes SLURM_CONF to Prolog/Epilog), else
``/etc/slurm/plugstack.conf``; ``include`` lines are followed (globs allowed).
No plugin line at all means the defaults below.
"""

from __future__ import annotations

import glob
import logging
import os
import shlex
from dataclasses import dataclass, replace
from typing import Final

from sifoverlay.errors import UsageError

__all__ = ["PLUGIN_SO", "SlurmConfig", "find_plugstack", "load_config", "parse_args"]

log = logging.getLogger(__name__)

PLUGIN_SO: Final = "sifoverlay_spank.so"
ENV_PLUGSTACK: Final = "SIFOVERLAY_PLUGSTACK"
_MAX_INCLUDE_DEPTH: Final = 4
_MODES: Final = ("rw", "ro")
_MOUNTS: Final = ("fuse", "kernel")
DEFAULT_MAX_OVERLAY: Final = 256 << 30
DEFAULT_HASH_DEADLINE: Final = 600.0
DEFAULT_LEASE_TTL: Final = 180.0  # seconds a Slurm lease lives without its keeper's heartbeat
DEFAULT_LEASE_GRACE: Final = 120.0  # then seconds before another node may break it
_UNITS: Final = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(key: str, value: str, source: str, *, units: bool = True) -> int:
    """A positive decimal with an optional K/M/G/T binary suffix (config.c check_size)."""
    digits, unit = (value[:-1], value[-1]) if units and value[-1:] in _UNITS else (value, "")
    if not digits.isdigit() or not digits.isascii() or len(digits) > 15:
        raise UsageError(source, f"plugstack: {key}={value}: expected a positive number"
                         + (" (optionally with K, M, G or T)" if units else ""))
    if int(digits) == 0:
        raise UsageError(source, f"plugstack: {key}={value}: must be positive")
    return int(digits) * _UNITS.get(unit, 1)


@dataclass(frozen=True, slots=True)
class SlurmConfig:
    journal_dir: str = "/var/lib/sifoverlay/journal"
    runtime_dir: str = "/run/sifoverlay"
    image_roots: tuple[str, ...] = ()  # empty: no restriction (logged at every Prolog)
    default_mode: str = "rw"
    sifoverlay: str | None = None  # the Python/executable running Prolog, Epilog, sweeper
    mount: str = "fuse"
    state_dir: str = "/var/lib/sifoverlay"  # root's lease records + scratch (engine/statedir.py)
    max_overlay: int = DEFAULT_MAX_OVERLAY  # bytes; bigger overlay regions are refused at Prolog
    min_free: int = 0  # bytes; a rw job on an overlay with less available is refused at Prolog (0: no minimum)
    hash_deadline: float = DEFAULT_HASH_DEADLINE  # seconds the Epilog may hash; then the sweeper
    lease_ttl: float = DEFAULT_LEASE_TTL  # docs/slurm.md "Leases, heartbeats and fencing"
    binds: str = ""  # site binds of every job, SRC[:DST[:ro|rw]],... (runtime.jobview)
    home: bool = True  # bind the job user's $HOME
    slurmd_spool_dir: str = "/var/spool/slurmd"  # used by the plugin only (srun --mpi=pmix)
    lease_grace: float = DEFAULT_LEASE_GRACE
    # rw job end: "async" unmounts and frees the node, a reconcile worker hashes and commits
    # under the job's lease (slurm/reconciler.py); "sync" does it all inside the Epilog
    epilog_reconcile: str = "async"
    # job start: "detached" lets the Prolog exit once the job holds its lease, its child
    # mounts while slurmd starts the job and the plugin waits for the rootfs (records.py);
    # "inline" mounts inside the Prolog (docs/slurm.md "Job start")
    prolog_mounts: str = "detached"
    source: str = "<defaults>"  # where the values came from, for messages

    @property
    def records_dir(self) -> str:
        """Per-job Prolog records the C plugin reads: <runtime_dir>/slurm/<job>/state."""
        return os.path.join(self.runtime_dir, "slurm")

    @property
    def mounts_dir(self) -> str:
        """base_dir handed to sifoverlay.runtime (mount points, per job)."""
        return os.path.join(self.runtime_dir, "mounts")


def _abs_path(key: str, value: str, source: str) -> str:
    if not value.startswith("/"):
        raise UsageError(source, f"plugstack: {key}={value}: not an absolute path")
    if "/../" in value + "/":
        raise UsageError(source, f"plugstack: {key}={value}: '..' is not allowed")
    if len(value) >= 4096:
        raise UsageError(source, f"plugstack: {key}: path too long")
    return value


def parse_args(args: list[str], *, source: str = "<plugstack>") -> SlurmConfig:
    """The plugin arguments (the words after the .so path) -> SlurmConfig. Strict:
    unknown key, missing '=', empty value or bad word -> UsageError naming the key."""
    config = SlurmConfig(source=source)
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key:
            raise UsageError(source, f"plugstack: argument {arg!r} is not key=value")
        if not value:
            raise UsageError(source, f"plugstack: {key}: empty value")
        if key in ("journal_dir", "runtime_dir", "sifoverlay", "state_dir"):
            config = replace(config, **{key: _abs_path(key, value, source)})
        elif key == "image_roots":
            roots = tuple(_abs_path(key, part, source) for part in value.split(":") if part)
            if not roots:
                raise UsageError(source, "plugstack: image_roots: empty list")
            config = replace(config, image_roots=roots)
        elif key == "default_mode":
            if value not in _MODES:
                raise UsageError(source, f"plugstack: default_mode={value}: expected rw or ro")
            config = replace(config, default_mode=value)
        elif key == "max_overlay":
            config = replace(config, max_overlay=parse_size(key, value, source))
        elif key == "min_free":
            config = replace(config, min_free=parse_size(key, value, source))
        elif key == "hash_deadline":
            config = replace(config, hash_deadline=float(parse_size(key, value, source, units=False)))
        elif key in ("lease_ttl", "lease_grace"):
            config = replace(config, **{key: float(parse_size(key, value, source, units=False))})
        elif key == "binds":
            from sifoverlay.runtime.jobview import parse_binds

            try:  # refuse a bad list where slurmd starts
                parse_binds(value, what="plugstack binds=")
            except UsageError as exc:
                raise UsageError(source, exc.problem) from None
            config = replace(config, binds=value)
        elif key == "slurmd_spool_dir":  # the plugin's (srun --mpi=pmix); checked here alike
            config = replace(config, slurmd_spool_dir=_abs_path(key, value, source))
        elif key == "epilog_reconcile":
            if value not in ("async", "sync"):
                raise UsageError(source, f"plugstack: epilog_reconcile={value}: expected async or sync")
            config = replace(config, epilog_reconcile=value)
        elif key == "prolog_mounts":
            if value not in ("detached", "inline"):
                raise UsageError(source, f"plugstack: prolog_mounts={value}: expected detached or inline")
            config = replace(config, prolog_mounts=value)
        elif key == "home":
            if value not in ("yes", "no"):
                raise UsageError(source, f"plugstack: home={value}: expected yes or no")
            config = replace(config, home=value == "yes")
        elif key == "mount":
            if value not in _MOUNTS:
                raise UsageError(source, f"plugstack: mount={value}: expected fuse or kernel")
            config = replace(config, mount=value)
        else:
            raise UsageError(source, f"plugstack: unknown key '{key}'")
    given = {arg.partition("=")[0] for arg in args}
    if "state_dir" in given and "journal_dir" not in given:
        # The journal lives beside the leases (issue 13): on a state directory shared by
        # all nodes, any node can finish or roll back an interrupted commit.
        config = replace(config, journal_dir=os.path.join(config.state_dir, "journal"))
    if config.lease_ttl <= 3 * 0.5:
        raise UsageError(source, f"plugstack: lease_ttl={config.lease_ttl:g}: must be at least 2 seconds")
    return config


def find_plugstack(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env  # type: ignore[assignment]
    explicit = env.get(ENV_PLUGSTACK)
    if explicit:
        return explicit
    slurm_conf = env.get("SLURM_CONF")
    if slurm_conf:
        return os.path.join(os.path.dirname(slurm_conf), "plugstack.conf")
    return "/etc/slurm/plugstack.conf"


def _plugin_line(path: str, depth: int = 0) -> tuple[list[str], str] | None:
    """The arguments of our plugin's line in `path` (following includes), or None."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(path, f"cannot read plugstack: {exc.strerror}") from None
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(path, f"line {number}: {exc}") from None
        if words[0] == "include" and len(words) >= 2:
            if depth >= _MAX_INCLUDE_DEPTH:
                raise UsageError(path, f"line {number}: includes nested too deep")
            pattern = words[1] if words[1].startswith("/") else os.path.join(os.path.dirname(path), words[1])
            for included in sorted(glob.glob(pattern)):
                found = _plugin_line(included, depth + 1)
                if found is not None:
                    return found
            continue
        if len(words) >= 2 and words[0] in ("required", "optional") and os.path.basename(words[1]) == PLUGIN_SO:
            return words[2:], f"{path}:{number}"
    return None


def load_config(plugstack: str | None = None, *, env: dict[str, str] | None = None) -> SlurmConfig:
    """Read the plugin's keys from plugstack.conf (see module docstring)."""
    path = plugstack or find_plugstack(env)
    found = _plugin_line(path)
    if found is None:
        log.warning("no %s line in %s (or its includes): using defaults", PLUGIN_SO, path)
        return SlurmConfig(source=path)
    args, where = found
    return parse_args(args, source=where)
