"""NVIDIA GPUs inside the image: find the host driver's user-space files the way
libnvidia-container and SingularityCE's nvliblist.conf do - a fixed list of library and
binary names, looked up in the ldconfig cache (``ldconfig -p``) and in PATH - and bind
them read-only under `TARGET` (``/.sifoverlay/nvidia/{lib,bin}``), appended to
LD_LIBRARY_PATH and PATH by runtime.environment.

Devices (`select`): when the job has a GPU allocation, the view shows only the allocated
/dev/nvidiaN (plus nvidiactl, nvidia-uvm, nvidia-uvm-tools, nvidia-modeset and
nvidia-caps/, which every GPU process needs); `enter` builds that /dev as a tmpfs holding
binds of the host's nodes (`DeviceView`). Which GPUs, first match wins:

1. ``SLURM_STEP_GPUS``, else ``SLURM_JOB_GPUS``: Slurm's global GPU ids on the node, i.e.
   positions in the node's GPU list, which is the /dev/nvidiaN nodes in minor order (the
   order the driver numbers them: PCI bus order).
2. ``CUDA_VISIBLE_DEVICES`` narrows that set (or, without a Slurm allocation, the host's
   GPUs). Integers index the set as CUDA does for the devices it can see: under Slurm
   with ConstrainDevices=yes they are 0..n-1 relative to the allocation; a value equal to
   the Slurm list itself (ConstrainDevices=no exports the global ids twice) means that
   list. ``GPU-<uuid>`` (or a unique prefix) is matched against the driver's
   /proc/driver/nvidia/gpus/*/information ("GPU UUID", "Device Minor"). A ``MIG-``
   UUID cannot be mapped to a node: the whole set stays visible. As CUDA does, the list
   ends at the first entry that names no GPU (with a warning).

Inside, CUDA numbers the visible GPUs 0..n-1, so an integer CUDA_VISIBLE_DEVICES is
rewritten to those positions (``1,3`` -> ``0,1``); UUIDs are left as they are.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sifoverlay.errors import UsageError

from .jobview import Bind

log = logging.getLogger(__name__)

TARGET = "/.sifoverlay/nvidia"
LIB_DIR = TARGET + "/lib"
BIN_DIR = TARGET + "/bin"

# Library base names (before ".so"): compute, management, video, graphics, optix.
LIBRARIES = (
    "libcuda", "libcudadebugger", "libnvidia-ml", "libnvidia-ptxjitcompiler", "libnvidia-nvvm",
    "libnvidia-fatbinaryloader", "libnvidia-opencl", "libnvidia-compiler", "libnvidia-cfg", "libnvidia-gpucomp",
    "libnvidia-allocator", "libnvidia-pkcs11", "libnvidia-pkcs11-openssl3", "libnvidia-encode", "libnvcuvid",
    "libnvidia-opticalflow", "libnvidia-fbc", "libnvidia-eglcore", "libnvidia-glcore", "libnvidia-tls",
    "libnvidia-glsi", "libnvidia-glvkspirv", "libnvidia-rtcore", "libnvoptix", "libGLX_nvidia", "libEGL_nvidia",
    "libGLESv2_nvidia", "libGLESv1_CM_nvidia", "libnvidia-ngx",
)
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
            "nvidia-cuda-mps-server")
CONTROL_DEVICES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
DRIVER_PROC = "/proc/driver/nvidia/gpus"  # <pci>/information: "GPU UUID:", "Device Minor:"
SLURM_ALLOCATION = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
NVIDIA_MAJOR = 195  # /dev/nvidiaN (minor N), nvidiactl (255), nvidia-modeset (254); nvidia-uvm has its own

_LDCONFIG_LINE = re.compile(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(/\S+)\s*$")
_GPU_DEVICE = re.compile(r"^nvidia([0-9]+)$")


@dataclass(frozen=True, slots=True)
class Driver:
    libraries: tuple[tuple[str, str], ...]  # (soname, host path)
    binaries: tuple[str, ...]  # host paths
    devices: tuple[str, ...]  # /dev/nvidia* present on the host

    @property
    def found(self) -> bool:
        return bool(self.libraries) or bool(self.binaries)


def ldconfig_cache(ldconfig: str | None = None) -> str:
    """`ldconfig -p` output ('' when there is no ldconfig)."""
    for candidate in ([ldconfig] if ldconfig else ["/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"]):
        try:
            proc = subprocess.run([candidate, "-p"], capture_output=True, text=True, timeout=30, check=False,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0:
            return proc.stdout
    return ""


def _is_64bit(tag: str) -> bool:
    return any(word in tag for word in ("x86-64", "AArch64", "64bit", "ppc64"))


def parse_ldconfig(text: str, names: Iterable[str] = LIBRARIES) -> list[tuple[str, str]]:
    """(soname, path) of the listed libraries in `ldconfig -p` output: 64-bit entries
    only (when the cache has both), one per soname, the first the cache lists."""
    wanted = tuple(names)
    entries: list[tuple[str, str, str]] = []
    for line in text.splitlines():
        match = _LDCONFIG_LINE.match(line)
        if not match:
            continue
        soname, tag, path = match.groups()
        base = soname.split(".so", 1)[0]
        if base in wanted and ".so" in soname:
            entries.append((soname, tag, path))
    wide = [e for e in entries if _is_64bit(e[1])]
    chosen: dict[str, str] = {}
    for soname, _tag, path in wide or entries:
        chosen.setdefault(soname, path)
    return sorted(chosen.items())


def find_binaries(search: Sequence[str], names: Iterable[str] = BINARIES) -> list[str]:
    found = []
    for name in names:
        for directory in search:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                found.append(path)
                break
    return found


def discover(*, ldconfig_text: str | None = None, search: Sequence[str] | None = None,
             dev_dir: str = "/dev") -> Driver:
    """The host driver's files (fakeable for tests: ldconfig output, binary dirs, /dev)."""
    text = ldconfig_cache() if ldconfig_text is None else ldconfig_text
    dirs = search if search is not None else ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin",
                                              "/usr/lib/nvidia/bin"]
    libraries = [(soname, path) for soname, path in parse_ldconfig(text) if os.path.exists(path)]
    try:
        devices = sorted(os.path.join(dev_dir, n) for n in os.listdir(dev_dir)
                         if n in CONTROL_DEVICES or _GPU_DEVICE.match(n))
    except OSError:
        devices = []
    return Driver(tuple(libraries), tuple(find_binaries(dirs)), tuple(devices))


def allocated(env: Mapping[str, str]) -> list[int] | None:
    """GPU indices the job names (None: no GPU allocation is known): Slurm's global ids,
    else CUDA_VISIBLE_DEVICES when it is a list of integers."""
    for name in (*SLURM_ALLOCATION, "CUDA_VISIBLE_DEVICES"):
        ids = _integers(env.get(name, ""))
        if ids is not None:
            return ids
    return None


def _integers(value: str) -> list[int] | None:
    parts = [part.strip() for part in value.split(",")]
    if not value.strip() or not all(part.isdigit() for part in parts):
        return None
    return [int(part) for part in parts]


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str  # "nvidia3" (under the device directory)
    minor: int


@dataclass(frozen=True, slots=True)
class Selection:
    """The GPUs a job sees: `visible` in the order selected; `hidden` the host's others."""

    visible: tuple[Gpu, ...]
    hidden: tuple[Gpu, ...]
    decided_by: str  # the variables that decided, e.g. "SLURM_JOB_GPUS+CUDA_VISIBLE_DEVICES"
    cuda_visible_devices: str | None  # CUDA_VISIBLE_DEVICES inside (None: leave it alone)


@dataclass(frozen=True, slots=True)
class DeviceView:
    """What `enter` mounts on the image's /dev: `source` bound whole when nothing is
    hidden, else a tmpfs holding a bind of every entry of `source` but the `hidden` ones."""

    source: str = "/dev"
    hidden: tuple[str, ...] = ()


def host_gpus(dev_dir: str = "/dev") -> list[Gpu]:
    """The /dev/nvidiaN character devices of NVIDIA's major (195), in minor order."""
    found = []
    try:
        names = os.listdir(dev_dir)
    except OSError:
        return []
    for name in names:
        if not _GPU_DEVICE.match(name):
            continue
        try:
            st = os.lstat(os.path.join(dev_dir, name))
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == NVIDIA_MAJOR:
            found.append(Gpu(name, os.minor(st.st_rdev)))
    return sorted(found, key=lambda gpu: gpu.minor)



def driver_uuids(proc_dir: str = DRIVER_PROC) -> dict[str, int]:
    """GPU UUID -> device minor, from the driver's /proc/driver/nvidia/gpus/*/information."""
    found: dict[str, int] = {}
    try:
        entries = sorted(os.listdir(proc_dir))
    except OSError:
        return found
    for entry in entries:
        try:
            with open(os.path.join(proc_dir, entry, "information"), encoding="utf-8", errors="replace") as f:
                text = f.read(65536)
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        uuid, minor = fields.get("GPU UUID", "").strip(), fields.get("Device Minor", "").strip()
        if uuid and minor.isdigit():
            found[uuid] = int(minor)
    return found


def select(env: Mapping[str, str], *, dev_dir: str = "/dev", proc_dir: str = DRIVER_PROC) -> Selection | None:
    """The GPUs the job sees (module docstring), or None when there is nothing to hide:
    no allocation is named, the host has no GPU, or a MIG UUID leaves them all."""
    gpus = host_gpus(dev_dir)
    if not gpus:
        return None
    decided: list[str] = []
    chosen = gpus
    slurm_ids: list[int] | None = None
    for name in SLURM_ALLOCATION:
        value = env.get(name, "").strip()
        if not value:
            continue
        slurm_ids = _integers(value)
        if slurm_ids is None:
            raise UsageError(None, f"{name}={value!r}: expected a comma-separated list of GPU ids")
        chosen = _take(gpus, slurm_ids, f"{name}={value}", what="GPU id", count=f"this node has {len(gpus)}")
        decided.append(name)
        break
    inside: str | None = None
    if "CUDA_VISIBLE_DEVICES" in env:
        value = env["CUDA_VISIBLE_DEVICES"].strip()
        narrowed = _narrow(chosen, value, slurm_ids, proc_dir)
        if narrowed is not None:
            chosen, renumber = narrowed
            decided.append("CUDA_VISIBLE_DEVICES")
            if renumber:
                order = sorted(gpu.minor for gpu in chosen)
                inside = ",".join(str(order.index(gpu.minor)) for gpu in chosen)
    if not decided:
        return None
    keep = {gpu.minor for gpu in chosen}
    return Selection(tuple(chosen), tuple(gpu for gpu in gpus if gpu.minor not in keep), "+".join(decided), inside)


def _take(pool: Sequence[Gpu], indices: Sequence[int], setting: str, *, what: str, count: str) -> list[Gpu]:
    """pool[i] for each index, up to the first that is out of range (as CUDA stops there)."""
    out: list[Gpu] = []
    for index in indices:
        if index >= len(pool):
            log.warning("%s: %s %d does not exist (%s): the list ends there", setting, what, index, count)
            break
        if pool[index] not in out:
            out.append(pool[index])
    return out


def _narrow(pool: list[Gpu], value: str, slurm_ids: list[int] | None,
            proc_dir: str) -> tuple[list[Gpu], bool] | None:
    """(the GPUs CUDA_VISIBLE_DEVICES keeps of `pool`, whether to renumber it inside), or
    None when it names no selection we can map (MIG UUIDs)."""
    setting = f"CUDA_VISIBLE_DEVICES={value}"
    if value in ("", "NoDevFiles"):  # CUDA: none visible; Slurm's word for a GRES without device files
        return ([], True) if value == "" else None
    integers = _integers(value)
    if integers is not None:
        if slurm_ids is not None and integers == slurm_ids:  # ConstrainDevices=no: the global ids again
            return pool, True
        return _take(pool, integers, setting, what="index", count=f"{len(pool)} visible"), True
    by_uuid = driver_uuids(proc_dir)
    out: list[Gpu] = []
    for part in (p.strip() for p in value.split(",")):
        if part.startswith("MIG-"):
            log.info("%s: MIG instances are not mapped to device nodes: every allocated GPU stays visible", setting)
            return None
        matches = [minor for uuid, minor in by_uuid.items() if part and uuid.startswith(part)]
        gpu = next((g for g in pool if len(matches) == 1 and g.minor == matches[0]), None)
        if gpu is None:
            log.warning("%s: %s names no single visible GPU: the list ends there", setting, part)
            break
        if gpu not in out:
            out.append(gpu)
    return out, False


def device_view(selection: Selection | None, dev_dir: str = "/dev") -> DeviceView:
    return DeviceView(dev_dir, tuple(gpu.name for gpu in selection.hidden) if selection else ())


def view_binds(driver: Driver, visible: str | None = None) -> tuple[tuple[Bind, ...], tuple[tuple[str, str], ...]]:
    """(system binds of the driver files, environment appends) for runtime.jobview/environment."""
    del visible  # devices: `select` and `DeviceView`
    binds = [Bind(path, f"{LIB_DIR}/{soname}", True, True, False) for soname, path in driver.libraries]
    binds += [Bind(path, f"{BIN_DIR}/{os.path.basename(path)}", True, True, False) for path in driver.binaries]
    append = (("PATH", BIN_DIR), ("LD_LIBRARY_PATH", LIB_DIR)) if binds else ()
    if not binds:
        log.warning("GPU requested but no NVIDIA driver files were found on this host")
    return tuple(binds), append


__all__ = ["BINARIES", "BIN_DIR", "DRIVER_PROC", "LIBRARIES", "LIB_DIR", "NVIDIA_MAJOR", "DeviceView", "Driver",
           "Gpu", "Selection", "allocated", "device_view", "discover", "driver_uuids", "find_binaries",
           "host_gpus", "ldconfig_cache", "parse_ldconfig", "select", "view_binds"]
