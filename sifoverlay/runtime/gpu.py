"""NVIDIA GPUs inside the image: find the host driver's user-space files the way
libnvidia-container and SingularityCE's nvliblist.conf do - a fixed list of library and
binary names, looked up in the ldconfig cache (``ldconfig -p``) and in PATH - and bind
them read-only under `TARGET` (``/.sifoverlay/nvidia/{lib,bin}``), appended to
LD_LIBRARY_PATH and PATH by runtime.environment.

Devices: /dev is the host's (bound whole), so /dev/nvidiactl, /dev/nvidia-uvm and the
/dev/nvidiaN nodes are there; `allocated` says which N the job was given (Slurm's
SLURM_STEP_GPUS/SLURM_JOB_GPUS, else CUDA_VISIBLE_DEVICES) and Slurm's device cgroup
(ConstrainDevices=yes) is what denies the others.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

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
    """GPU indices given to the job (None: no GPU allocation is known)."""
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = env.get(name, "").strip()
        if value and all(part.strip().isdigit() for part in value.split(",")):
            return [int(part) for part in value.split(",")]
    return None


def view_binds(driver: Driver, visible: str | None = None) -> tuple[tuple[Bind, ...], tuple[tuple[str, str], ...]]:
    """(system binds of the driver files, environment appends) for runtime.jobview/environment."""
    del visible  # devices come with /dev; the cgroup restricts them
    binds = [Bind(path, f"{LIB_DIR}/{soname}", True, True, False) for soname, path in driver.libraries]
    binds += [Bind(path, f"{BIN_DIR}/{os.path.basename(path)}", True, True, False) for path in driver.binaries]
    append = (("PATH", BIN_DIR), ("LD_LIBRARY_PATH", LIB_DIR)) if binds else ()
    if not binds:
        log.warning("GPU requested but no NVIDIA driver files were found on this host")
    return tuple(binds), append


__all__ = ["BINARIES", "BIN_DIR", "LIBRARIES", "LIB_DIR", "Driver", "allocated", "discover", "find_binaries",
           "ldconfig_cache", "parse_ldconfig", "view_binds"]
